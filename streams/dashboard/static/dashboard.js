// The live dashboard page. Every data string is put in the page as text (textContent, option.text),
// never as HTML; every request goes to this page's own origin.
(() => {
  'use strict';

  const ALL = '*';
  // one card per headline metric (SPEC section 5); better: which direction is good news
  const CARDS = [
    { key: 'nps', label: 'Net Promoter Score', fmt: 'score', better: 'up', sub: npsSub },
    { key: 'csat', label: 'Satisfaction (CSAT)', fmt: 'pct', better: 'up', sub: (m) => responses(m.csat_responses) },
    { key: 'ces', label: 'Effort score (CES, 1–7)', fmt: 'dec2', better: null, sub: (m) => responses(m.ces_responses) },
    { key: 'cli', label: 'Loyalty index (CLI)', fmt: 'score', better: 'up', sub: (m) => responses(m.cli_responses) },
    { key: 'customers_end', label: 'Active customers', fmt: 'int', better: 'up', sub: (m) => count(m.new_customers, 'new in window') },
    { key: 'retention_rate', label: 'Retention', fmt: 'pct', better: 'up', sub: (m) => count(m.customers_start, 'at window start') },
    { key: 'churn_rate', label: 'Churn', fmt: 'pct', better: 'down', sub: (m) => count(m.churned_customers, 'customers lost') },
    { key: 'repeat_purchase_rate', label: 'Repeat purchase rate', fmt: 'pct', better: 'up', sub: (m) => ofCount(m.returning_customers, m.purchasers, 'buyers') },
    { key: 'revenue_churn_rate', label: 'Revenue churn', fmt: 'pct', better: 'down', sub: (m, c) => moneyText(m.churned_revenue, c, 'lost') },
    { key: 'net_revenue_retention', label: 'Net revenue retention', fmt: 'pct', better: 'up', sub: (m, c) => moneyText(m.revenue_prev_period, c, 'previous period') },
    { key: 'clv', label: 'Customer lifetime value', fmt: 'money', better: 'up', sub: (m, c) => moneyText(m.aov, c, 'per order') },
    { key: 'cac', label: 'Acquisition cost (CAC)', fmt: 'money', better: 'down', sub: (m, c) => moneyText(m.marketing_spend, c, 'spent') },
    { key: 'net_revenue', label: 'Net revenue', fmt: 'money', better: 'up', sub: (m) => count(m.orders, 'orders') },
    { key: 'participation_rate', label: 'Loyalty participation', fmt: 'pct', better: 'up', sub: (m) => count(m.loyalty_members, 'members') },
    { key: 'redemption_rate', label: 'Reward redemption', fmt: 'pct', better: 'up', sub: (m) => ofCount(m.rewards_redeemed, m.rewards_issued, 'rewards') },
  ];
  // null for * when the stores use different currencies (SPEC 5): said so on their cards
  const MONETARY = new Set(['clv', 'cac', 'net_revenue', 'revenue_churn_rate', 'net_revenue_retention']);
  const DIGITS = { pct: 1, score: 1, dec2: 2, int: 0, money: 2 };
  const HISTORY_CAP = 12000; // points kept in the page (the stream keeps ~10,000)
  const COLORS = { line: '#5cc8ff', retention: '#5cc8ff', churn: '#ff8f5c', nps: '#c9a0ff', band: 'rgba(201,160,255,0.22)' };

  const state = {
    stores: [], windows: [], windowMs: {}, store: ALL, window: '',
    snap: null, series: null, pending: null, gen: 0, cohorts: null, cohortView: 'active',
    alerts: new Map(), es: null, sse: 'connecting', redis: 'up',
    cards: {}, sparks: {}, charts: {},
  };

  const $ = (id) => document.getElementById(id);
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
  const fmtCache = new Map();
  function numberFormat(options) {
    const key = JSON.stringify(options);
    // signDisplay 'negative': a value that rounds to zero never shows as "-0.0"
    if (!fmtCache.has(key)) fmtCache.set(key, new Intl.NumberFormat(undefined, { signDisplay: 'negative', ...options }));
    return fmtCache.get(key);
  }
  const fixed = (digits) => numberFormat({ minimumFractionDigits: digits, maximumFractionDigits: digits });

  // -- formatting ------------------------------------------------------------------------------

  function money(value, currency, { compact = false } = {}) {
    // compact: whole units, and 1.2M style from 100,000 on (big totals); else cents
    const options = compact ? { maximumFractionDigits: 0 } : { maximumFractionDigits: 2, minimumFractionDigits: 2 };
    if (compact && Math.abs(value) >= 100000) Object.assign(options, { notation: 'compact', maximumFractionDigits: 1 });
    if (currency) {
      try {
        return numberFormat({ ...options, style: 'currency', currency }).format(value);
      } catch (_) { /* not an ISO 4217 code: the number and the code */ }
    }
    return numberFormat(options).format(value) + (currency ? ' ' + currency : '');
  }

  function formatValue(card, value, currency) {
    if (!isNum(value)) return '—';
    switch (card.fmt) {
      case 'pct': return fixed(1).format(value) + '%';
      case 'score': return fixed(1).format(value);
      case 'dec2': return fixed(2).format(value);
      case 'int': return fixed(0).format(value);
      case 'money': return money(value, currency, { compact: card.key === 'net_revenue' });
      default: return String(value);
    }
  }

  function formatChange(card, delta, currency) {
    const sign = (text) => (delta > 0 ? '+' : delta < 0 ? '−' : '±') + text;
    const abs = Math.abs(delta);
    switch (card.fmt) {
      case 'pct': return sign(fixed(1).format(abs)) + ' pts';
      case 'score': return sign(fixed(1).format(abs));
      case 'dec2': return sign(fixed(2).format(abs));
      case 'int': return sign(fixed(0).format(abs));
      case 'money': return sign(money(abs, currency, { compact: card.key === 'net_revenue' }));
      default: return sign(String(abs));
    }
  }

  function npsSub(m) {
    if (!isNum(m.nps_ci_low) || !isNum(m.nps_ci_high)) return responses(m.nps_responses);
    return `95% CI ${fixed(0).format(m.nps_ci_low)} to ${fixed(0).format(m.nps_ci_high)} · n = ${fixed(0).format(m.nps_responses)}`;
  }
  function responses(n) { return isNum(n) ? `${fixed(0).format(n)} responses` : ''; }
  function count(n, what) { return isNum(n) ? `${fixed(0).format(n)} ${what}` : ''; }
  function ofCount(a, b, what) { return isNum(a) && isNum(b) ? `${fixed(0).format(a)} of ${fixed(0).format(b)} ${what}` : ''; }
  function moneyText(v, currency, what) { return isNum(v) ? `${money(v, currency, { compact: true })} ${what}` : ''; }

  function storeLabel(store) { return store === ALL ? 'All stores' : store; }

  function durationText(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 90) return `${s} s`;
    if (s < 5400) return `${Math.round(s / 60)} min`;
    if (s < 172800) return `${Math.round(s / 3600)} h`;
    return `${Math.round(s / 86400)} days`;
  }

  // -- data ------------------------------------------------------------------------------------

  async function getJSON(path) {
    const response = await fetch(path, { cache: 'no-store' });
    if (response.status === 404) return null;
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return response.json();
  }

  function query() {
    return new URLSearchParams({ store: state.store, window: state.window }).toString();
  }

  // last index whose time is <= t, or -1
  function indexAtOrBefore(times, t) {
    let lo = 0, hi = times.length - 1, found = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (times[mid] <= t) { found = mid; lo = mid + 1; } else { hi = mid - 1; }
    }
    return found;
  }

  function appendSnapshot(snap) {
    const series = state.series;
    const times = series.as_of_ms;
    const n = times.length;
    const t = snap.as_of_ms;
    if (n && t < times[n - 1]) return;
    const replace = n > 0 && t === times[n - 1];
    if (!replace) times.push(t);
    for (const [name, column] of Object.entries(series.values)) {
      const v = isNum(snap.metrics[name]) ? snap.metrics[name] : null;
      if (replace) column[n - 1] = v; else column.push(v);
    }
    if (times.length > HISTORY_CAP) {
      const cut = times.length - HISTORY_CAP;
      times.splice(0, cut);
      for (const column of Object.values(series.values)) column.splice(0, cut);
    }
  }

  async function loadMeta() {
    const meta = await getJSON('/api/meta');
    state.stores = meta.stores;
    state.windows = meta.windows;
    state.windowMs = meta.window_ms;
    renderPickers();
  }

  // the state of the chosen store and window, read again (first load, a change of picker, a resync)
  async function load() {
    const gen = ++state.gen;
    const q = query();
    try {
      const [snap, series, alerts, cohorts] = await Promise.all([
        getJSON('/api/snapshot?' + q), getJSON('/api/series?' + q), getJSON('/api/alerts?limit=100'),
        getJSON('/api/cohorts?' + new URLSearchParams({ store: state.store })),
      ]);
      if (gen !== state.gen) return; // the pickers moved on meanwhile
      state.snap = snap;
      if (cohorts && (!state.cohorts || cohorts.as_of_ms >= state.cohorts.as_of_ms)) state.cohorts = cohorts;
      state.series = series || { as_of_ms: [], values: {} };
      const pending = state.pending;
      state.pending = null;
      if (pending && (!snap || pending.as_of_ms >= snap.as_of_ms)) applySnapshot(pending);
      state.alerts = new Map();
      for (const alert of alerts || []) rememberAlert(alert);
      renderAll();
    } catch (err) {
      if (gen === state.gen) setTimeout(() => { if (gen === state.gen) load(); }, 3000);
    }
  }

  function applySnapshot(snap) {
    if (state.snap && snap.as_of_ms < state.snap.as_of_ms) return;
    state.snap = snap;
    appendSnapshot(snap);
  }

  function onSnapshot(snap) {
    if (snap.store_id !== state.store || snap.window !== state.window) return;
    if (!state.series) { state.pending = snap; return; }
    applySnapshot(snap);
    renderAll();
  }

  function onCohorts(matrix) {
    if (matrix.store_id !== state.store) return;
    if (state.cohorts && matrix.as_of_ms < state.cohorts.as_of_ms) return;
    state.cohorts = matrix;
    renderCohorts();
  }

  function rememberAlert(alert) {
    if (!alert || typeof alert.alert_id !== 'string') return;
    const known = state.alerts.get(alert.alert_id);
    if (known && known.state === 'resolved' && alert.state === 'firing') return;
    state.alerts.set(alert.alert_id, alert);
  }

  // -- live stream -----------------------------------------------------------------------------

  function connect() {
    if (state.es) state.es.close();
    const es = new EventSource('/events?' + query());
    state.es = es;
    let broken = false;
    es.onopen = () => {
      state.sse = 'up';
      renderLive();
      if (broken) { broken = false; loadMeta().catch(() => {}); load(); } // missed updates while away
    };
    es.onerror = () => {
      broken = true;
      state.sse = 'connecting';
      renderLive();
      if (es.readyState === EventSource.CLOSED) setTimeout(() => { if (state.es === es) connect(); }, 3000);
    };
    es.addEventListener('snapshot', (e) => onSnapshot(JSON.parse(e.data)));
    es.addEventListener('cohorts', (e) => onCohorts(JSON.parse(e.data)));
    es.addEventListener('alert', (e) => { rememberAlert(JSON.parse(e.data)); renderAlerts(); });
    es.addEventListener('status', (e) => { state.redis = JSON.parse(e.data).redis; renderLive(); });
    es.addEventListener('resync', () => load());
  }

  function choose(store, window) {
    state.store = store;
    state.window = window;
    state.snap = null;
    state.series = null;
    state.pending = null;
    state.cohorts = null;
    history.replaceState(null, '', '?' + query());
    renderPickers();
    renderAll();
    connect();
    load();
  }

  // -- rendering -------------------------------------------------------------------------------

  function renderPickers() {
    const storeSelect = $('store');
    const stores = state.stores.includes(state.store) ? state.stores : [...state.stores, state.store];
    storeSelect.replaceChildren(...stores.map((s) => new Option(storeLabel(s), s, false, s === state.store)));
    const windowSelect = $('window');
    windowSelect.replaceChildren(...state.windows.map((w) => new Option(w, w, false, w === state.window)));
  }

  function buildCards() {
    const grid = $('cards');
    for (const card of CARDS) {
      const node = el('article', 'card');
      node.dataset.metric = card.key;
      const parts = {
        label: el('div', 'label', card.label),
        value: el('div', 'value none', '—'),
        change: el('div', 'change none', ''),
        sub: el('div', 'sub', ''),
        spark: el('div', 'spark'),
      };
      node.append(parts.label, parts.value, parts.change, parts.sub, parts.spark);
      grid.append(node);
      state.cards[card.key] = parts;
    }
  }

  function sparkOptions(width) {
    return {
      width, height: Math.max(30, $('cards').querySelector('.spark').clientHeight),
      pxAlign: false, cursor: { show: false }, select: { show: false }, legend: { show: false },
      scales: { x: { time: false } }, axes: [{ show: false }, { show: false }],
      series: [{}, { stroke: COLORS.line, width: 2, fill: 'rgba(92,200,255,0.14)', spanGaps: true, points: { show: false } }],
    };
  }

  function renderCards() {
    const snap = state.snap;
    const metrics = snap ? snap.metrics : {};
    const currency = snap ? snap.currency : null;
    const series = state.series;
    const windowMs = state.windowMs[state.window] || 0;
    let prevIndex = -1;
    if (snap && series) prevIndex = indexAtOrBefore(series.as_of_ms, snap.as_of_ms - windowMs);
    for (const card of CARDS) {
      const parts = state.cards[card.key];
      const value = metrics[card.key];
      parts.value.textContent = formatValue(card, value, currency);
      parts.value.className = 'value' + (isNum(value) ? '' : ' none');
      parts.sub.textContent = snap ? card.sub(metrics, currency) : '';
      const column = series && series.values[card.key];
      const before = prevIndex >= 0 && column ? column[prevIndex] : null;
      if (!snap) {
        parts.change.textContent = '';
        parts.change.className = 'change none';
      } else if (!isNum(value)) {
        parts.change.textContent = MONETARY.has(card.key) && !currency && state.store === ALL
          ? 'mixed store currencies' : 'no data for it in this window';
        parts.change.className = 'change none';
      } else if (isNum(before)) {
        // the change as shown (rounded), so a tiny drift is "±0.0", not a red "−0.0"
        const delta = Number((value - before).toFixed(DIGITS[card.fmt]));
        const tone = delta === 0 || !card.better ? 'flat' : (delta > 0) === (card.better === 'up') ? 'good' : 'bad';
        const arrow = delta > 0 ? '▲ ' : delta < 0 ? '▼ ' : '';
        parts.change.textContent = `${arrow}${formatChange(card, delta, currency)} vs ${state.window} ago`;
        parts.change.className = 'change ' + tone;
      } else {
        parts.change.textContent = prevIndex < 0 ? `no data ${state.window} ago yet` : `no value ${state.window} ago`;
        parts.change.className = 'change none';
      }
      renderSpark(card, column);
    }
  }

  function renderSpark(card, column) {
    const box = state.cards[card.key].spark;
    const series = state.series;
    let data = [[], []];
    if (series && column && series.as_of_ms.length) {
      const times = series.as_of_ms;
      const span = 2 * (state.windowMs[state.window] || 0); // the sparkline shows the last two windows
      const start = Math.max(0, indexAtOrBefore(times, times[times.length - 1] - span));
      data = [times.slice(start).map((t) => t / 1000), column.slice(start)];
    }
    let plot = state.sparks[card.key];
    if (!plot) {
      plot = new uPlot(sparkOptions(box.clientWidth || 200), data, box);
      state.sparks[card.key] = plot;
    } else {
      plot.setData(data);
    }
  }

  const AXIS = { stroke: '#c9d4df', font: '15px system-ui, sans-serif', grid: { stroke: '#243140', width: 1 }, ticks: { stroke: '#243140' } };
  const percentTicks = (u, vals) => vals.map((v) => v + '%');

  // y range from the 2nd to the 98th percentile (padded): the first snapshots of a history, over
  // tiny populations, can be far off (a retention of -2,000%) and would flatten everything else
  function robustRange(seriesIndex) {
    return (u) => {
      const values = u.data[seriesIndex].filter(isNum).sort((a, b) => a - b);
      if (!values.length) return [0, 100];
      const lo = values[Math.floor(values.length * 0.02)];
      const hi = values[Math.min(values.length - 1, Math.floor(values.length * 0.98))];
      const pad = Math.max(1, (hi - lo) * 0.1);
      return [Math.floor(lo - pad), Math.ceil(hi + pad)];
    };
  }

  function chartOptions(width, height, series, yAxes, extra) {
    const { scales, ...rest } = extra || {};
    return {
      width, height, pxAlign: false,
      legend: { show: false }, // the captions name the lines, in large type
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, ...scales },
      axes: [{ ...AXIS, size: 46 }, ...yAxes],
      series: [{}, ...series],
      ...rest,
    };
  }

  // the plot box is sized by the layout; uPlot's height is the canvas, without the legend under it
  function chartHeight(box) {
    const legend = box.querySelector('.u-legend');
    return Math.max(140, box.clientHeight - (legend ? legend.offsetHeight : 40));
  }

  function renderCharts() {
    const series = state.series || { as_of_ms: [], values: {} };
    const x = series.as_of_ms.map((t) => t / 1000);
    const col = (name) => series.values[name] || x.map(() => null);
    const specs = {
      retention: {
        box: $('chart-retention'),
        data: [x, col('retention_rate'), col('churn_rate')],
        // one axis each (left retention, right churn): on one 0-100 scale both lines would look flat
        options: (w, h) => chartOptions(w, h, [
          { label: 'Retention %', scale: 'retention', stroke: COLORS.retention, width: 3, points: { show: false } },
          { label: 'Churn %', scale: 'churn', stroke: COLORS.churn, width: 3, points: { show: false } },
        ], [
          { ...AXIS, scale: 'retention', stroke: COLORS.retention, size: 64, values: percentTicks },
          { ...AXIS, scale: 'churn', side: 1, stroke: COLORS.churn, size: 64, values: percentTicks, grid: { show: false } },
        ], { scales: { retention: { range: robustRange(1) }, churn: { range: robustRange(2) } } }),
      },
      nps: {
        box: $('chart-nps'),
        data: [x, col('nps'), col('nps_ci_low'), col('nps_ci_high')],
        options: (w, h) => chartOptions(w, h, [
          { label: 'NPS', stroke: COLORS.nps, width: 3, points: { show: false } },
          { label: '95% low', stroke: 'rgba(201,160,255,0.45)', width: 1, points: { show: false } },
          { label: '95% high', stroke: 'rgba(201,160,255,0.45)', width: 1, points: { show: false } },
        ], [{ ...AXIS, size: 56 }], { bands: [{ series: [3, 2], fill: COLORS.band }] }),
      },
    };
    for (const [name, spec] of Object.entries(specs)) {
      const plot = state.charts[name];
      if (!plot) {
        const height = chartHeight(spec.box);
        const created = new uPlot(spec.options(spec.box.clientWidth || 600, height), spec.data, spec.box);
        created.setSize({ width: spec.box.clientWidth || 600, height: chartHeight(spec.box) }); // legend now measured
        state.charts[name] = created;
      } else {
        plot.setData(spec.data);
      }
    }
  }

  // churn, repeat purchase and net revenue of each NPS segment (the *_by_nps_segment maps)
  const SEGMENTS = [['promoter', 'Promoters'], ['passive', 'Passives'], ['detractor', 'Detractors'], ['none', 'No answer']];

  function renderSegments() {
    const m = (state.snap && state.snap.metrics) || {};
    const churn = m.churn_rate_by_nps_segment || {};
    const repeat = m.repeat_purchase_rate_by_nps_segment || {};
    const revenue = m.net_revenue_by_nps_segment || null;
    const currency = state.snap && state.snap.currency;
    const largest = Math.max(1e-9, ...SEGMENTS.map(([key]) => (isNum(churn[key]) ? churn[key] : 0)));
    const rows = SEGMENTS.map(([key, label]) => {
      const row = el('div', 'segment-row');
      row.setAttribute('role', 'row');
      const track = el('div', 'track');
      const bar = el('div', 'bar ' + key);
      bar.style.width = (isNum(churn[key]) ? (100 * churn[key]) / largest : 0) + '%';
      track.append(bar);
      const value = el('div', 'value', isNum(churn[key]) ? fixed(1).format(churn[key]) + '%' : '–');
      const parts = [];
      if (isNum(repeat[key])) parts.push(`repeat ${fixed(1).format(repeat[key])}%`);
      if (revenue && isNum(revenue[key])) parts.push(`${money(revenue[key], currency, { compact: true })} net`);
      row.append(el('div', 'name', label), track, value, el('div', 'more', parts.join(' · ')));
      return row;
    });
    $('segment-bars').replaceChildren(...rows);
    // the question a loyalty team asks most: do detractors actually leave?
    const ratio = $('segment-ratio');
    const d = churn.detractor;
    const p = churn.promoter;
    if (isNum(d) && isNum(p) && p > 0) {
      const times = d / p;
      ratio.textContent = `Detractors churn ${fixed(1).format(times)}× as often as promoters`;
      ratio.className = 'segment-ratio ' + (times > 1 ? 'bad' : 'good');
    } else {
      ratio.textContent = isNum(d) ? `Detractors churn ${fixed(1).format(d)}%; no promoter churned` : 'Not enough NPS answers yet';
      ratio.className = 'segment-ratio';
    }
  }

  // cohort retention (the loyalty.cohorts.v1 matrix): customers by month of first activity (rows), the
  // share still active, or that ordered, in each month since (columns), as a heatmap
  const COHORT_VIEWS = { active: ['active_rate', 'active_customers', 'still active'], ordered: ['purchase_rate', 'purchasers', 'ordered'] };

  function cohortMonth(label) {
    const [year, month] = String(label).split('-').map(Number);
    if (!year || !month) return String(label);
    return new Date(Date.UTC(year, month - 1, 1)).toLocaleDateString(undefined, { month: 'short', year: '2-digit', timeZone: 'UTC' });
  }

  function renderCohorts() {
    const [rateKey, countKey, what] = COHORT_VIEWS[state.cohortView];
    for (const button of document.querySelectorAll('#cohort-view button')) {
      button.setAttribute('aria-pressed', String(button.dataset.view === state.cohortView));
    }
    const rows = state.cohorts && Array.isArray(state.cohorts.cohorts) ? state.cohorts.cohorts : [];
    const cells = [el('div', 'head corner', 'Cohort'), el('div', 'head', 'Size')];
    for (let period = 0; period < 12; period++) cells.push(el('div', 'head', period === 0 ? 'M0' : '+' + period));
    for (const row of rows) {
      cells.push(el('div', 'name', cohortMonth(row.cohort)));
      cells.push(el('div', 'size', isNum(row.customers) ? fixed(0).format(row.customers) : '–'));
      const rates = Array.isArray(row[rateKey]) ? row[rateKey] : [];
      const counts = Array.isArray(row[countKey]) ? row[countKey] : [];
      for (let period = 0; period < 12; period++) {
        const rate = rates[period];
        const cell = el('div', 'cell');
        if (isNum(rate)) {
          const share = Math.max(0, Math.min(100, rate)) / 100;
          cell.style.background = `rgba(92, 200, 255, ${(0.07 + 0.93 * share).toFixed(3)})`;
          cell.classList.add(share > 0.55 ? 'dark' : 'light');
          cell.textContent = fixed(0).format(rate);
          cell.title = `${row.cohort} +${period} months: ${counts[period]} of ${row.customers} customers ${what} (${fixed(1).format(rate)}%)`;
        } else {
          cell.classList.add('empty');
        }
        cells.push(cell);
      }
    }
    $('cohort-grid').replaceChildren(...cells);
    $('cohort-empty').hidden = rows.some((row) => row.customers > 0);
  }

  function renderHeader() {
    const scope = $('scope');
    const name = el('strong', '', storeLabel(state.store));
    const snap = state.snap;
    const tail = snap ? ` · last ${state.window}` + (snap.currency ? ` · money in ${snap.currency}` : '')
      : ` · last ${state.window} · waiting for the first snapshot…`;
    scope.replaceChildren(name, document.createTextNode(tail));
    document.title = `Loyalty · ${storeLabel(state.store)} · ${state.window}`;
    renderAge();
  }

  function renderAge() {
    const snap = state.snap;
    if (!snap) { $('asof').textContent = ''; return; }
    const when = new Date(snap.as_of_ms);
    const text = when.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
    $('asof').textContent = `as of ${text} (${durationText(Date.now() - snap.as_of_ms)} ago)`;
  }

  function renderLive() {
    const live = $('live');
    if (state.sse !== 'up') { live.textContent = 'reconnecting…'; live.className = 'live connecting'; }
    else if (state.redis !== 'up') { live.textContent = 'Redis unavailable, retrying'; live.className = 'live down'; }
    else { live.textContent = 'live'; live.className = 'live up'; }
  }

  const KIND = { churn_spike: 'Churn spike', nps_drop: 'NPS drop' };

  function alertLine(alert, firing) {
    const item = el('li');
    item.append(el('span', 'what', `${KIND[alert.kind] || String(alert.kind)} · ${storeLabel(String(alert.store_id))} · ${String(alert.window || '')}`));
    const detail = typeof alert.message === 'string' && alert.message ? alert.message
      : `observed ${alert.observed}, threshold ${alert.threshold}`;
    item.append(document.createTextNode(detail));
    const at = isNum(alert.as_of_ms) ? new Date(alert.as_of_ms).toLocaleString(undefined, { dateStyle: 'short', timeStyle: 'short' }) : '';
    item.append(el('span', 'when', `${firing ? 'since' : 'resolved'} ${at}`));
    return item;
  }

  function renderAlerts() {
    const all = [...state.alerts.values()].sort((a, b) => (b.as_of_ms || 0) - (a.as_of_ms || 0));
    const firing = all.filter((a) => a.state === 'firing');
    // the chosen store's alerts first, then the others
    firing.sort((a, b) => (b.store_id === state.store) - (a.store_id === state.store));
    const box = $('alerts');
    const list = $('alert-list');
    if (firing.length) {
      box.className = 'alerts firing';
      $('alert-title').textContent = firing.length === 1 ? '⚠ 1 active alert' : `⚠ ${firing.length} active alerts`;
      list.replaceChildren(...firing.slice(0, 4).map((a) => alertLine(a, true)));
    } else {
      box.className = 'alerts calm';
      $('alert-title').textContent = 'No active alerts';
      const last = all.find((a) => a.state === 'resolved');
      list.replaceChildren(...(last ? [alertLine(last, false)] : []));
    }
  }

  function renderAll() {
    renderHeader();
    renderCards();
    renderCharts();
    renderSegments();
    renderCohorts();
    renderAlerts();
    renderLive();
  }

  function resize() {
    for (const [key, plot] of Object.entries(state.sparks)) {
      const box = state.cards[key].spark;
      plot.setSize({ width: box.clientWidth, height: Math.max(30, box.clientHeight) });
    }
    for (const [name, plot] of Object.entries(state.charts)) {
      const box = $(name === 'nps' ? 'chart-nps' : 'chart-retention');
      plot.setSize({ width: box.clientWidth, height: chartHeight(box) });
    }
  }

  // -- start -----------------------------------------------------------------------------------

  async function start() {
    const params = new URLSearchParams(location.search);
    try {
      await loadMeta();
    } catch (err) {
      $('scope').textContent = 'the dashboard service does not answer; retrying…';
      setTimeout(start, 3000);
      return;
    }
    const wanted = params.get('window');
    const window = state.windows.includes(wanted) ? wanted : state.windows[0];
    choose(params.get('store') || ALL, window);
    $('store').addEventListener('change', (e) => choose(e.target.value, state.window));
    for (const button of document.querySelectorAll('#cohort-view button')) {
      button.addEventListener('click', () => { state.cohortView = button.dataset.view; renderCohorts(); });
    }
    $('window').addEventListener('change', (e) => choose(state.store, e.target.value));
    let resizeTimer = 0;
    addEventListener('resize', () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(resize, 150); });
    setInterval(renderAge, 1000);
    setInterval(() => loadMeta().catch(() => {}), 60000); // new stores appear in the picker
  }

  buildCards();
  start();
})();
