/* The innermost loops of the facts stage and the aggregation in C.
 *
 * metrics._blocks.grouped_rows(deltas) turns a message's {series: {bucket: delta}} into the
 * deltas topic's form, as metrics.customer._grouped_rows does.
 *
 * metrics._blocks.add_pairs(blocks, sums, pairs, floor, sparse_max, densify, widen) does to the
 * same objects what the Python loop of metrics.store._add_pairs does: every block holds the same
 * values and every block sum is the same (a sum of 0 may have no entry where the Python loop's
 * order wrote one: no entry means 0), and it returns the sum of the deltas below ``floor``
 * for the series' base. It adds in bucket order, so that consecutive deltas of one block share
 * its lookup and its block-sum update (the deltas topic's pairs come in the facts' order); the
 * deltas of one bucket keep theirs. It returns None, having changed nothing, when a pair is not
 * two ints or a bucket does not fit in 64 bits: the caller then runs the Python loop.
 *
 * Blocks are those of metrics.store.PrefixSeries: a dict of slot -> delta while sparse, an array of
 * int8, int16, int32 or int64 ('b', 'h', 'i', 'q') once dense, a list once a value left int64.
 * Exactness: int64 additions are checked for overflow, and anything that overflows is done on
 * Python ints; a sum that leaves its slot's type is handed to ``widen``, which makes the block the
 * narrowest type that holds it (a list past int64), as the Python loop does.
 * Only the kinds may differ, in one corner: a sparse block that a sum took out of int64 and back
 * may be densified, in the other order, while out (a list, where the Python loop makes an array).
 *
 * metrics._blocks.dense_sum(block, start, stop) sums a range of a dense block's slots, as
 * ``sum(block[start:stop])`` does, without copying them (metrics.store._slot_sum).
 *
 * metrics._blocks.order_deltas(out, ...) adds a customer's order-family contributions into a
 * message's deltas, as metrics.customer._order_deltas does: the same deltas, added in the same
 * order (so the series' dicts come out alike, key order included). It returns None, having
 * changed nothing, when a bucket, a time or a window does not fit in 62 bits, or an argument is
 * not of the expected type: the caller then runs the Python loop. Revenue amounts stay Python
 * ints (exact at any size); buckets and lifespans are int64, within 62 bits checked first.
 *
 * metrics._blocks.DeltaAccumulator holds a message's deltas of one store as int64 cells (exact past
 * them); the contribution loops add into it as into a dict of dicts, and its rows() are what
 * grouped_rows gives for the dict the same additions make.
 *
 * Built beside the mypyc modules by scripts/compile_metrics.py; without it the Python loop runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <string.h>

#define BLOCK_BITS 10
#define BLOCK_SIZE (1LL << BLOCK_BITS)
#define BLOCK_MASK (BLOCK_SIZE - 1)

/* An exact running sum: ``small`` while it fits in int64, the rest spilled into a Python int. */
typedef struct {
    long long small;
    PyObject *big; /* NULL: 0 */
} ExactSum;

static int exact_spill(ExactSum *sum, PyObject *value)
{
    PyObject *total;
    if (sum->big == NULL) {
        Py_INCREF(value);
        sum->big = value;
        return 0;
    }
    total = PyNumber_Add(sum->big, value);
    if (total == NULL)
        return -1;
    Py_SETREF(sum->big, total);
    return 0;
}

static int exact_add_small(ExactSum *sum, long long value)
{
    long long result;
    PyObject *spilled;
    int failed;
    if (!__builtin_add_overflow(sum->small, value, &result)) {
        sum->small = result;
        return 0;
    }
    spilled = PyLong_FromLongLong(sum->small);
    if (spilled == NULL)
        return -1;
    failed = exact_spill(sum, spilled);
    Py_DECREF(spilled);
    sum->small = value;
    return failed;
}

/* The sum as a new reference. */
static PyObject *exact_value(const ExactSum *sum)
{
    PyObject *small = PyLong_FromLongLong(sum->small);
    PyObject *total;
    if (small == NULL || sum->big == NULL)
        return small;
    total = PyNumber_Add(sum->big, small);
    Py_DECREF(small);
    return total;
}

/* 1 when the sum is not zero, 0 when it is, -1 on error. */
static int exact_nonzero(const ExactSum *sum)
{
    PyObject *value;
    int truth;
    if (sum->big == NULL)
        return sum->small != 0;
    value = exact_value(sum);
    if (value == NULL)
        return -1;
    truth = PyObject_IsTrue(value);
    Py_DECREF(value);
    return truth;
}

static void exact_clear(ExactSum *sum)
{
    sum->small = 0;
    Py_CLEAR(sum->big);
}

/* Python's ``bucket >> BLOCK_BITS`` (a floor division, also below zero). */
static long long block_of(long long bucket)
{
    return bucket >= 0 ? bucket >> BLOCK_BITS : -((-(bucket + 1)) >> BLOCK_BITS) - 1;
}

enum { SPARSE, DENSE, WIDE };

/* The block being written: its index, kind, and for a dense one its int64 slots. */
typedef struct {
    PyObject *index; /* NULL: none yet */
    PyObject *block;
    int kind;
    Py_buffer view;
    int viewing;
} Current;

static void current_release(Current *current)
{
    if (current->viewing) {
        PyBuffer_Release(&current->view);
        current->viewing = 0;
    }
    Py_CLEAR(current->block);
}

/* 1 when ``format`` is that of a dense block type of ``itemsize`` bytes (metrics.store._DENSE_TYPES). */
static int dense_format(const char *format, Py_ssize_t itemsize)
{
    return (strcmp(format, "b") == 0 && itemsize == 1) || (strcmp(format, "h") == 0 && itemsize == 2)
        || (strcmp(format, "i") == 0 && itemsize == 4) || (strcmp(format, "q") == 0 && itemsize == 8);
}

/* A dense slot's value, whatever its width. */
static long long slot_get(const Py_buffer *view, long long slot)
{
    switch (view->itemsize) {
    case 1: return ((const signed char *)view->buf)[slot];
    case 2: return ((const short *)view->buf)[slot];
    case 4: return ((const int *)view->buf)[slot];
    default: return ((const long long *)view->buf)[slot];
    }
}

/* Store ``value`` in a dense slot; 0 when it does not fit the slot's width (nothing written). */
static int slot_put(Py_buffer *view, long long slot, long long value)
{
    switch (view->itemsize) {
    case 1:
        if (value < SCHAR_MIN || value > SCHAR_MAX)
            return 0;
        ((signed char *)view->buf)[slot] = (signed char)value;
        return 1;
    case 2:
        if (value < SHRT_MIN || value > SHRT_MAX)
            return 0;
        ((short *)view->buf)[slot] = (short)value;
        return 1;
    case 4:
        if (value < INT_MIN || value > INT_MAX)
            return 0;
        ((int *)view->buf)[slot] = (int)value;
        return 1;
    default:
        ((long long *)view->buf)[slot] = value;
        return 1;
    }
}

/* Take ``block`` (a new reference) as the current block. */
static int current_take(Current *current, PyObject *block)
{
    current_release(current);
    current->block = block;
    if (PyDict_CheckExact(block)) {
        current->kind = SPARSE;
        return 0;
    }
    if (PyList_CheckExact(block)) {
        if (PyList_GET_SIZE(block) != BLOCK_SIZE) {
            PyErr_SetString(PyExc_ValueError, "a block list must have one slot per bucket of the block");
            return -1;
        }
        current->kind = WIDE;
        return 0;
    }
    if (PyObject_GetBuffer(block, &current->view, PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
        return -1;
    current->viewing = 1;
    if (current->view.format == NULL || current->view.len != current->view.itemsize * BLOCK_SIZE
        || !dense_format(current->view.format, current->view.itemsize)) {
        PyErr_SetString(PyExc_TypeError,
                        "a dense block must be an array of type 'b', 'h', 'i' or 'q' of one slot per bucket");
        return -1;
    }
    current->kind = DENSE;
    return 0;
}

/* sums[index] = sums.get(index, 0) + run, when run is not zero; run starts again at zero. */
static int flush_run(PyObject *sums, PyObject *index, ExactSum *run)
{
    PyObject *value, *total;
    int nonzero = exact_nonzero(run), failed;
    if (nonzero <= 0) {
        exact_clear(run);
        return nonzero;
    }
    value = exact_value(run);
    exact_clear(run);
    if (value == NULL)
        return -1;
    total = PyDict_GetItemWithError(sums, index);
    if (total == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(value);
            return -1;
        }
        failed = PyDict_SetItem(sums, index, value);
        Py_DECREF(value);
        return failed;
    }
    total = PyNumber_Add(total, value);
    Py_DECREF(value);
    if (total == NULL)
        return -1;
    failed = PyDict_SetItem(sums, index, total);
    Py_DECREF(total);
    return failed;
}

/* Make the block of ``index`` current, creating an empty sparse one when the series has none. */
static int switch_block(Current *current, PyObject *blocks, long long index)
{
    PyObject *key = PyLong_FromLongLong(index), *found;
    if (key == NULL)
        return -1;
    Py_XSETREF(current->index, key);
    found = PyDict_GetItemWithError(blocks, key);
    if (found == NULL) {
        if (PyErr_Occurred())
            return -1;
        found = PyDict_New();
        if (found == NULL)
            return -1;
        if (PyDict_SetItem(blocks, key, found) < 0) {
            Py_DECREF(found);
            return -1;
        }
        return current_take(current, found);
    }
    Py_INCREF(found);
    return current_take(current, found);
}

/* Replace the current block by ``replacement`` (a new reference) in ``blocks`` and make it current. */
static int replace_block(Current *current, PyObject *blocks, PyObject *replacement)
{
    if (replacement == NULL)
        return -1;
    if (PyDict_SetItem(blocks, current->index, replacement) < 0) {
        Py_DECREF(replacement);
        return -1;
    }
    return current_take(current, replacement);
}

static int add_sparse(Current *current, PyObject *blocks, long long slot, PyObject *delta,
                      Py_ssize_t sparse_max, PyObject *densify)
{
    PyObject *key = PyLong_FromLongLong(slot), *old, *value;
    int failed;
    if (key == NULL)
        return -1;
    old = PyDict_GetItemWithError(current->block, key);
    if (old == NULL && PyErr_Occurred()) {
        Py_DECREF(key);
        return -1;
    }
    if (old == NULL) {
        PyObject *zero = PyLong_FromLong(0);
        value = zero == NULL ? NULL : PyNumber_Add(zero, delta);
        Py_XDECREF(zero);
    } else {
        value = PyNumber_Add(old, delta);
    }
    if (value == NULL) {
        Py_DECREF(key);
        return -1;
    }
    failed = PyDict_SetItem(current->block, key, value);
    Py_DECREF(key);
    Py_DECREF(value);
    if (failed < 0)
        return -1;
    if (PyDict_GET_SIZE(current->block) > sparse_max)
        return replace_block(current, blocks, PyObject_CallOneArg(densify, current->block));
    return 0;
}

static int add_dense(Current *current, PyObject *blocks, long long slot, PyObject *bucket_object,
                     PyObject *delta, int delta_fits, long long delta_small, PyObject *widen)
{
    long long result;
    PyObject *widened, *block;
    if (delta_fits && !__builtin_add_overflow(slot_get(&current->view, slot), delta_small, &result)
        && slot_put(&current->view, slot, result))
        return 0;
    /* out of the block's type (or of int64): ``widen`` makes it the narrowest that holds the sum, as the
     * Python loop's ``block[slot] += delta`` raising OverflowError does */
    current_release(current);
    widened = PyObject_CallFunctionObjArgs(widen, blocks, bucket_object, delta, NULL);
    if (widened == NULL)
        return -1;
    Py_DECREF(widened);
    block = PyDict_GetItemWithError(blocks, current->index);
    if (block == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_KeyError, "widen removed the block it widened");
        return -1;
    }
    Py_INCREF(block);
    return current_take(current, block);
}

static int add_wide(Current *current, long long slot, PyObject *delta)
{
    PyObject *total = PyNumber_Add(PyList_GET_ITEM(current->block, slot), delta);
    if (total == NULL)
        return -1;
    return PyList_SetItem(current->block, slot, total); /* steals total */
}

/* A pair's bucket and where it lies in the pairs list. */
typedef struct {
    long long bucket;
    Py_ssize_t item;
} Pair;

static int by_bucket(const void *left, const void *right)
{
    const Pair *a = left, *b = right;
    if (a->bucket != b->bucket)
        return a->bucket < b->bucket ? -1 : 1;
    return a->item < b->item ? -1 : a->item > b->item;
}

/* Sorted by bucket, then position: an insertion sort for the short runs most series send. */
static void sort_pairs(Pair *pairs, Py_ssize_t count)
{
    Py_ssize_t done, at;
    if (count > 64) {
        qsort(pairs, (size_t)count, sizeof(Pair), by_bucket);
        return;
    }
    for (done = 1; done < count; done++) {
        Pair next = pairs[done];
        for (at = done; at > 0 && by_bucket(&pairs[at - 1], &next) > 0; at--)
            pairs[at] = pairs[at - 1];
        pairs[at] = next;
    }
}

static PyObject *add_pairs(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *blocks, *sums, *pairs, *densify, *widen, *result = NULL;
    long long floor, bucket, delta_small;
    Py_ssize_t count, item, position, sparse_max;
    Pair *order;
    int in_order = 1;
    ExactSum folded = {0, NULL}, run = {0, NULL};
    Current current;
    long long block_index = 0;
    int overflow, delta_fits, failed = 0;
    (void)module;

    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "add_pairs(blocks, sums, pairs, floor, sparse_max, densify, widen)");
        return NULL;
    }
    blocks = args[0];
    sums = args[1];
    pairs = args[2];
    densify = args[5];
    widen = args[6];
    if (!PyDict_CheckExact(blocks) || !PyDict_CheckExact(sums)) {
        PyErr_SetString(PyExc_TypeError, "blocks and sums must be dicts");
        return NULL;
    }
    sparse_max = PyLong_AsSsize_t(args[4]);
    if (sparse_max == -1 && PyErr_Occurred())
        return NULL;
    floor = PyLong_AsLongLongAndOverflow(args[3], &overflow);
    if (floor == -1 && PyErr_Occurred())
        return NULL;
    if (overflow || !PyList_CheckExact(pairs))
        Py_RETURN_NONE;
    count = PyList_GET_SIZE(pairs);
    if (count & 1) {
        PyErr_Format(PyExc_ValueError, "an odd number of bucket/delta items (%zd)", count);
        return NULL;
    }
    order = PyMem_Malloc(sizeof(Pair) * (size_t)(count / 2 + 1));
    if (order == NULL)
        return PyErr_NoMemory();
    /* every item an int and every bucket in int64, or nothing is done here */
    for (item = 0; item < count; item++) {
        PyObject *value = PyList_GET_ITEM(pairs, item);
        if (!PyLong_Check(value)) {
            PyMem_Free(order);
            Py_RETURN_NONE;
        }
        if (!(item & 1)) {
            bucket = PyLong_AsLongLongAndOverflow(value, &overflow);
            if ((bucket == -1 && PyErr_Occurred()) || overflow) {
                PyMem_Free(order);
                if (overflow)
                    Py_RETURN_NONE;
                return NULL;
            }
            if (item > 0 && bucket < order[item / 2 - 1].bucket)
                in_order = 0;
            order[item / 2].bucket = bucket;
            order[item / 2].item = item;
        }
    }
    /* in bucket order, consecutive deltas of one block share its lookup and its block-sum update
     * (the order of additions changes no sum) */
    if (!in_order)
        sort_pairs(order, count / 2);

    memset(&current, 0, sizeof(current));
    /* the pairs list is held: the callbacks (densify, widen) must not see it freed under the loop */
    Py_INCREF(pairs);
    for (position = 0; position < count / 2 && !failed; position++) {
        PyObject *bucket_object, *delta;
        long long index, slot;
        item = order[position].item;
        bucket_object = PyList_GET_ITEM(pairs, item);
        delta = PyList_GET_ITEM(pairs, item + 1);
        bucket = order[position].bucket;
        delta_small = PyLong_AsLongLongAndOverflow(delta, &overflow);
        if (delta_small == -1 && PyErr_Occurred()) {
            failed = 1;
            break;
        }
        delta_fits = !overflow;
        if (bucket < floor) {
            failed = delta_fits ? exact_add_small(&folded, delta_small) : exact_spill(&folded, delta);
            continue;
        }
        index = block_of(bucket);
        if (current.index == NULL || index != block_index) {
            if (current.index != NULL && flush_run(sums, current.index, &run) < 0) {
                failed = 1;
                break;
            }
            block_index = index;
            if (switch_block(&current, blocks, index) < 0) {
                failed = 1;
                break;
            }
        }
        slot = (long long)((unsigned long long)bucket & (unsigned long long)BLOCK_MASK);
        if (current.kind == SPARSE)
            failed = add_sparse(&current, blocks, slot, delta, sparse_max, densify) < 0;
        else if (current.kind == DENSE)
            failed = add_dense(&current, blocks, slot, bucket_object, delta, delta_fits, delta_small, widen) < 0;
        else
            failed = add_wide(&current, slot, delta) < 0;
        if (!failed)
            failed = (delta_fits ? exact_add_small(&run, delta_small) : exact_spill(&run, delta)) < 0;
    }
    if (!failed && current.index != NULL && flush_run(sums, current.index, &run) < 0)
        failed = 1;
    if (!failed)
        result = exact_value(&folded);
    current_release(&current);
    Py_XDECREF(current.index);
    exact_clear(&run);
    exact_clear(&folded);
    Py_DECREF(pairs);
    PyMem_Free(order);
    return result;
}

/* grouped_rows(deltas): the nonzero deltas grouped by series, as metrics.customer._grouped_rows. */
static PyObject *grouped_rows(PyObject *module, PyObject *deltas)
{
    if (!PyDict_Check(deltas)) {
        PyErr_SetString(PyExc_TypeError, "grouped_rows: deltas must be a dict of dicts");
        return NULL;
    }
    PyObject *groups = PyList_New(0);
    PyObject *pairs = NULL;  /* the current series' pairs: every error path below releases both */
    if (groups == NULL)
        return NULL;
    Py_ssize_t position = 0;
    PyObject *series, *buckets;
    while (PyDict_Next(deltas, &position, &series, &buckets)) {
        if (!PyDict_Check(buckets)) {
            PyErr_SetString(PyExc_TypeError, "grouped_rows: deltas must be a dict of dicts");
            goto error;
        }
        if ((pairs = PyList_New(0)) == NULL)
            goto error;
        Py_ssize_t inner = 0;
        PyObject *bucket, *delta;
        while (PyDict_Next(buckets, &inner, &bucket, &delta)) {
            if (!PyLong_CheckExact(delta)) {  /* a plain int's truth runs no Python code (a subclass's
                                                  * __bool__ could fail or change the dict) */
                PyErr_SetString(PyExc_TypeError, "grouped_rows: deltas must be ints");
                goto error;
            }
            if (PyObject_IsTrue(delta) && (PyList_Append(pairs, bucket) < 0 || PyList_Append(pairs, delta) < 0))
                goto error;
        }
        if (PyList_GET_SIZE(pairs) > 0 && (PyList_Append(groups, series) < 0 || PyList_Append(groups, pairs) < 0))
            goto error;
        Py_CLEAR(pairs);
    }
    return groups;
error:
    Py_XDECREF(pairs);
    Py_DECREF(groups);
    return NULL;
}

/* dense_sum(block, start, stop): the sum of ``block[start:stop]`` for a dense block (an array of
 * 'b', 'h', 'i' or 'q'), exact at any size; None for anything else, which the caller sums in Python.
 * ``start`` and ``stop`` are clipped to the block as a slice's non-negative bounds are (a negative
 * one is refused: no caller has one). A prefix read of a series sums part of one block, which a
 * slice and ``sum`` did by copying the slots into a new array and each into a Python int. */
static PyObject *dense_sum(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    long long start, stop, length, slot;
    ExactSum total = {0, NULL};
    PyObject *result;
    (void)module;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "dense_sum(block, start, stop)");
        return NULL;
    }
    start = PyLong_AsLongLong(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    stop = PyLong_AsLongLong(args[2]);
    if (stop == -1 && PyErr_Occurred())
        return NULL;
    if (start < 0 || stop < 0) {
        PyErr_SetString(PyExc_ValueError, "dense_sum: start and stop must not be negative");
        return NULL;
    }
    /* a list (a block past int64) or a dict (a sparse one) has no buffer; bytes have one of format B */
    if (!PyObject_CheckBuffer(args[0]))
        Py_RETURN_NONE;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_FORMAT | PyBUF_ND) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_BufferError))
            return NULL;
        PyErr_Clear();  /* not contiguous: no block, Python sums it */
        Py_RETURN_NONE;
    }
    if (view.ndim != 1 || view.format == NULL || !dense_format(view.format, view.itemsize)) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    length = (long long)(view.len / view.itemsize);
    if (stop > length)
        stop = length;
    if (view.itemsize < 8) {
        /* slots of at most 32 bits: a block (1,024 slots; any under 2**32) cannot leave int64 */
        for (slot = start; slot < stop; slot++)
            total.small += slot_get(&view, slot);
    } else {
        const long long *slots = (const long long *)view.buf;
        for (slot = start; slot < stop; slot++) {
            if (exact_add_small(&total, slots[slot]) < 0) {
                PyBuffer_Release(&view);
                exact_clear(&total);
                return NULL;
            }
        }
    }
    PyBuffer_Release(&view);
    result = exact_value(&total);
    exact_clear(&total);
    return result;
}

/* ---- order_deltas ------------------------------------------------------------------------ */

/* values beyond this many bits are declined (the Python loop takes them): sums of two stay in int64 */
#define ORDER_LIMIT (1LL << 62)
/* the longest window or horizon the C loops take, in buckets: a value within ORDER_LIMIT plus or minus
 * twice this stays within int64 */
#define LENGTH_LIMIT (1LL << 40)

/* a Python int within +-2**62 as a long long; 0 when it is not one (no exception left set) */
static int small_int(PyObject *value, long long *result)
{
    int overflow = 0;
    long long number;
    if (!PyLong_CheckExact(value))
        return 0;
    number = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow || (number == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    if (number > ORDER_LIMIT || number < -ORDER_LIMIT)
        return 0;
    *result = number;
    return 1;
}

/* ---- DeltaAccumulator -------------------------------------------------------------------- */

/* A message's deltas of one store, {series: {bucket: delta}} as C arrays: what the facts stage adds
 * into (metrics.customer.new_deltas). A customer's contributions before its events are added with
 * sign -1 and those after with +1, and most of them cancel: here they cancel in int64 cells, where
 * a dict of dicts made a Python int for every bucket and every sum. Exact: a sum that leaves int64
 * is kept as a Python int from then on. Series and buckets keep their first-insertion order, as a
 * dict's keys do, so rows() is grouped_rows of the dict the same additions would have made. */

typedef struct {
    long long bucket;
    long long small;
    PyObject *big; /* the exact value once a sum left int64 (small is then unused), else NULL */
} Cell;

typedef struct {
    PyObject *name;
    Cell *cells; /* in first-insertion order */
    Py_ssize_t count, capacity;
    Py_ssize_t *slots; /* open addressing over cells: index + 1, 0 when free; mask + 1 of them */
    Py_ssize_t mask;
} SeriesCells;

typedef struct {
    PyObject_HEAD
    PyObject *positions; /* series name -> its index in series (a Python int) */
    SeriesCells *series;
    Py_ssize_t count, capacity;
    PyObject *last_name; /* the name looked up last (owned by its series), and its index */
    Py_ssize_t last_position;
} DeltaAccumulator;

static PyTypeObject DeltaAccumulatorType;

/* where a native loop adds a series' deltas: a dict's series dict, or a series of an accumulator */
typedef struct {
    PyObject *buckets; /* borrowed; NULL for an accumulator */
    DeltaAccumulator *accumulator;
    Py_ssize_t position;
} Series;

/* out is a dict of dicts or a DeltaAccumulator: the loops' targets */
static int deltas_target(PyObject *out)
{
    return PyDict_Check(out) || Py_IS_TYPE(out, &DeltaAccumulatorType);
}

static size_t bucket_hash(long long bucket)
{
    return (size_t)(((unsigned long long)bucket * 0x9E3779B97F4A7C15ULL) >> 32);
}

static int cells_rehash(SeriesCells *series, Py_ssize_t slot_count)
{
    Py_ssize_t *slots = PyMem_New(Py_ssize_t, slot_count), i;
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(slots, 0, sizeof(Py_ssize_t) * (size_t)slot_count);
    for (i = 0; i < series->count; i++) {
        size_t slot = bucket_hash(series->cells[i].bucket) & (size_t)(slot_count - 1);
        while (slots[slot] != 0)
            slot = (slot + 1) & (size_t)(slot_count - 1);
        slots[slot] = i + 1;
    }
    PyMem_Free(series->slots);
    series->slots = slots;
    series->mask = slot_count - 1;
    return 0;
}

/* the cell of bucket, made (0) when missing; NULL on an error */
static Cell *cell_of(SeriesCells *series, long long bucket)
{
    size_t slot = bucket_hash(bucket) & (size_t)series->mask;
    Py_ssize_t found;
    Cell *cell;
    while ((found = series->slots[slot]) != 0) {
        if (series->cells[found - 1].bucket == bucket)
            return &series->cells[found - 1];
        slot = (slot + 1) & (size_t)series->mask;
    }
    /* at most two thirds full, so every probe ends: grown before the new cell, so that a failure
     * leaves the table as it was */
    if (3 * (series->count + 1) > 2 * (series->mask + 1)) {
        if (cells_rehash(series, 2 * (series->mask + 1)) < 0)
            return NULL;
        slot = bucket_hash(bucket) & (size_t)series->mask;
        while (series->slots[slot] != 0)
            slot = (slot + 1) & (size_t)series->mask;
    }
    if (series->count == series->capacity) {
        Py_ssize_t capacity = series->capacity * 2;
        /* PyMem_Realloc, not PyMem_Resize, which sets its pointer argument to NULL on failure */
        Cell *cells = (Cell *)PyMem_Realloc(series->cells, sizeof(Cell) * (size_t)capacity);
        if (cells == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        series->cells = cells;
        series->capacity = capacity;
    }
    cell = &series->cells[series->count++];
    cell->bucket = bucket;
    cell->small = 0;
    cell->big = NULL;
    series->slots[slot] = series->count;
    return cell;
}

/* cell += delta, on Python ints once the sum leaves int64 */
static int cell_add_object(Cell *cell, PyObject *delta);

static int cell_add_small(Cell *cell, long long delta)
{
    long long sum;
    if (cell->big == NULL && !__builtin_add_overflow(cell->small, delta, &sum)) {
        cell->small = sum;
        return 0;
    }
    PyObject *value = PyLong_FromLongLong(delta);
    int result;
    if (value == NULL)
        return -1;
    result = cell_add_object(cell, value);
    Py_DECREF(value);
    return result;
}

static int cell_add_object(Cell *cell, PyObject *delta)
{
    long long small;
    int overflow = 0;
    PyObject *current, *sum;
    if (cell->big == NULL) {
        small = PyLong_AsLongLongAndOverflow(delta, &overflow);
        if (small == -1 && PyErr_Occurred())
            return -1;
        if (!overflow && !__builtin_add_overflow(cell->small, small, &small)) {
            cell->small = small;
            return 0;
        }
        if ((current = PyLong_FromLongLong(cell->small)) == NULL)
            return -1;
    }
    else {
        current = cell->big;
        Py_INCREF(current);
    }
    sum = PyNumber_Add(current, delta);
    Py_DECREF(current);
    if (sum == NULL)
        return -1;
    Py_XSETREF(cell->big, sum);
    return 0;
}

/* the index of series name, made empty when missing; -1 on an error */
static Py_ssize_t accumulator_series(DeltaAccumulator *self, PyObject *name)
{
    PyObject *found, *position;
    SeriesCells *series;
    if (name == self->last_name)
        return self->last_position;
    if ((found = PyDict_GetItemWithError(self->positions, name)) != NULL) {
        self->last_name = self->series[PyLong_AsSsize_t(found)].name;
        self->last_position = PyLong_AsSsize_t(found);
        return self->last_position;
    }
    if (PyErr_Occurred())
        return -1;
    if (!PyUnicode_CheckExact(name)) {
        PyErr_SetString(PyExc_TypeError, "DeltaAccumulator: a series name must be a str");
        return -1;
    }
    if (self->count == self->capacity) {
        Py_ssize_t capacity = self->capacity ? 2 * self->capacity : 16;
        SeriesCells *grown = (SeriesCells *)PyMem_Realloc(self->series, sizeof(SeriesCells) * (size_t)capacity);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->series = grown;
        self->capacity = capacity;
    }
    series = &self->series[self->count];
    memset(series, 0, sizeof *series);
    if ((series->cells = PyMem_New(Cell, 4)) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    series->capacity = 4;
    if (cells_rehash(series, 8) < 0) {
        PyMem_Free(series->cells);
        return -1;
    }
    if ((position = PyLong_FromSsize_t(self->count)) == NULL || PyDict_SetItem(self->positions, name, position) < 0) {
        Py_XDECREF(position);
        PyMem_Free(series->cells);
        PyMem_Free(series->slots);
        return -1;
    }
    Py_DECREF(position);
    Py_INCREF(name);
    series->name = name;
    self->last_name = name;
    self->last_position = self->count;
    return self->count++;
}

/* out[name] as a Series (a dict's series dict made empty when missing: metrics.customer._series) */
static int series_of(PyObject *out, PyObject *name, Series *series)
{
    PyObject *buckets;
    if (Py_IS_TYPE(out, &DeltaAccumulatorType)) {
        series->buckets = NULL;
        series->accumulator = (DeltaAccumulator *)out;
        series->position = accumulator_series(series->accumulator, name);
        return series->position < 0 ? -1 : 0;
    }
    series->accumulator = NULL;
    buckets = PyDict_GetItemWithError(out, name);
    if (buckets != NULL) {
        if (!PyDict_Check(buckets)) {
            PyErr_SetString(PyExc_TypeError, "deltas must be a dict of dicts");
            return -1;
        }
        series->buckets = buckets;
        return 0;
    }
    if (PyErr_Occurred() || (buckets = PyDict_New()) == NULL)
        return -1;
    if (PyDict_SetItem(out, name, buckets) < 0) {
        Py_DECREF(buckets);
        return -1;
    }
    Py_DECREF(buckets); /* out holds it */
    series->buckets = buckets;
    return 0;
}

/* series[bucket] = series.get(bucket, 0) + delta */
static int add_object(const Series *series, long long bucket, PyObject *delta)
{
    PyObject *key, *old, *sum;
    int result;
    if (series->buckets == NULL) {
        Cell *cell = cell_of(&series->accumulator->series[series->position], bucket);
        return cell == NULL ? -1 : cell_add_object(cell, delta);
    }
    if ((key = PyLong_FromLongLong(bucket)) == NULL)
        return -1;
    old = PyDict_GetItemWithError(series->buckets, key);
    if (old != NULL)
        sum = PyNumber_Add(old, delta);
    else if (PyErr_Occurred())
        sum = NULL;
    else {
        Py_INCREF(delta);
        sum = delta;
    }
    if (sum == NULL) {
        Py_DECREF(key);
        return -1;
    }
    result = PyDict_SetItem(series->buckets, key, sum);
    Py_DECREF(key);
    Py_DECREF(sum);
    return result;
}

static int add_small(const Series *series, long long bucket, long long delta)
{
    PyObject *value;
    int result;
    if (series->buckets == NULL) {
        Cell *cell = cell_of(&series->accumulator->series[series->position], bucket);
        return cell == NULL ? -1 : cell_add_small(cell, delta);
    }
    if ((value = PyLong_FromLongLong(delta)) == NULL)
        return -1;
    result = add_object(series, bucket, value);
    Py_DECREF(value);
    return result;
}

static int cell_nonzero(const Cell *cell)
{
    return cell->big != NULL ? PyObject_IsTrue(cell->big) : cell->small != 0;
}

static PyObject *cell_value(const Cell *cell)
{
    if (cell->big != NULL) {
        Py_INCREF(cell->big);
        return cell->big;
    }
    return PyLong_FromLongLong(cell->small);
}

static void accumulator_clear_series(DeltaAccumulator *self)
{
    Py_ssize_t s, i;
    for (s = 0; s < self->count; s++) {
        SeriesCells *series = &self->series[s];
        for (i = 0; i < series->count; i++)
            Py_XDECREF(series->cells[i].big);
        Py_DECREF(series->name);
        PyMem_Free(series->cells);
        PyMem_Free(series->slots);
    }
    PyMem_Free(self->series);
    self->series = NULL;
    self->count = self->capacity = 0;
    self->last_name = NULL;
}

static PyObject *accumulator_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    DeltaAccumulator *self;
    if (PyTuple_GET_SIZE(args) > 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) > 0)) {
        PyErr_SetString(PyExc_TypeError, "DeltaAccumulator() takes no arguments");
        return NULL;
    }
    if ((self = (DeltaAccumulator *)type->tp_alloc(type, 0)) == NULL)
        return NULL;
    if ((self->positions = PyDict_New()) == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void accumulator_dealloc(DeltaAccumulator *self)
{
    accumulator_clear_series(self);
    Py_XDECREF(self->positions);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* a bucket as a long long; -1 with OverflowError or TypeError set when it is not an int of 64 bits */
static int bucket_argument(PyObject *value, long long *bucket)
{
    if (!PyLong_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "DeltaAccumulator: a bucket must be an int");
        return -1;
    }
    *bucket = PyLong_AsLongLong(value);
    return *bucket == -1 && PyErr_Occurred() ? -1 : 0;
}

static int accumulator_add_one(DeltaAccumulator *self, PyObject *name, PyObject *bucket_object, PyObject *delta)
{
    Series series;
    long long bucket;
    if (bucket_argument(bucket_object, &bucket) < 0)
        return -1;
    if (!PyLong_Check(delta)) {
        PyErr_SetString(PyExc_TypeError, "DeltaAccumulator: a delta must be an int");
        return -1;
    }
    if (series_of((PyObject *)self, name, &series) < 0)
        return -1;
    return add_object(&series, bucket, delta);
}

/* add(series, bucket, delta): metrics.customer.add_delta into the accumulator */
static PyObject *accumulator_add(DeltaAccumulator *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "add takes 3 arguments (series, bucket, delta)");
        return NULL;
    }
    if (accumulator_add_one(self, args[0], args[1], args[2]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* add_deltas(deltas): add a {series: {bucket: delta}} (what a Python loop built) */
static PyObject *accumulator_add_deltas(DeltaAccumulator *self, PyObject *deltas)
{
    Py_ssize_t position = 0, inner;
    PyObject *name, *buckets, *bucket, *delta;
    if (!PyDict_Check(deltas)) {
        PyErr_SetString(PyExc_TypeError, "add_deltas: deltas must be a dict of dicts");
        return NULL;
    }
    while (PyDict_Next(deltas, &position, &name, &buckets)) {
        if (!PyDict_Check(buckets)) {
            PyErr_SetString(PyExc_TypeError, "add_deltas: deltas must be a dict of dicts");
            return NULL;
        }
        /* the series first, as a dict's key, even when it has no deltas (the rows' series order) */
        if (accumulator_series(self, name) < 0)
            return NULL;
        inner = 0;
        while (PyDict_Next(buckets, &inner, &bucket, &delta))
            if (accumulator_add_one(self, name, bucket, delta) < 0)
                return NULL;
    }
    Py_RETURN_NONE;
}

/* rows(): the nonzero deltas grouped by series, as grouped_rows of the equivalent dict */
static PyObject *accumulator_rows(DeltaAccumulator *self, PyObject *unused)
{
    PyObject *groups = PyList_New(0), *pairs = NULL, *value;
    Py_ssize_t s, i, nonzero;
    (void)unused;
    if (groups == NULL)
        return NULL;
    for (s = 0; s < self->count; s++) {
        const SeriesCells *series = &self->series[s];
        for (i = 0, nonzero = 0; i < series->count; i++) {
            int truth = cell_nonzero(&series->cells[i]);
            if (truth < 0)
                goto error;
            nonzero += truth;
        }
        if (nonzero == 0)
            continue;
        if ((pairs = PyList_New(2 * nonzero)) == NULL)
            goto error;
        for (i = 0, nonzero = 0; i < series->count; i++) {
            const Cell *cell = &series->cells[i];
            if (!cell_nonzero(cell))
                continue;
            if ((value = PyLong_FromLongLong(cell->bucket)) == NULL)
                goto error;
            PyList_SET_ITEM(pairs, 2 * nonzero, value);
            if ((value = cell_value(cell)) == NULL)
                goto error;
            PyList_SET_ITEM(pairs, 2 * nonzero + 1, value);
            nonzero++;
        }
        if (PyList_Append(groups, series->name) < 0 || PyList_Append(groups, pairs) < 0)
            goto error;
        Py_CLEAR(pairs);
    }
    return groups;
error:
    Py_XDECREF(pairs);
    Py_DECREF(groups);
    return NULL;
}

/* as_dict(): {series: {bucket: delta}} with the zeros left out (and series left empty) */
static PyObject *accumulator_as_dict(DeltaAccumulator *self, PyObject *unused)
{
    PyObject *result = PyDict_New(), *buckets = NULL, *key = NULL, *value = NULL;
    Py_ssize_t s, i;
    (void)unused;
    if (result == NULL)
        return NULL;
    for (s = 0; s < self->count; s++) {
        const SeriesCells *series = &self->series[s];
        if ((buckets = PyDict_New()) == NULL)
            goto error;
        for (i = 0; i < series->count; i++) {
            const Cell *cell = &series->cells[i];
            int truth = cell_nonzero(cell);
            if (truth < 0)
                goto error;
            if (!truth)
                continue;
            if ((key = PyLong_FromLongLong(cell->bucket)) == NULL || (value = cell_value(cell)) == NULL
                || PyDict_SetItem(buckets, key, value) < 0)
                goto error;
            Py_CLEAR(key);
            Py_CLEAR(value);
        }
        if (PyDict_GET_SIZE(buckets) > 0 && PyDict_SetItem(result, series->name, buckets) < 0)
            goto error;
        Py_CLEAR(buckets);
    }
    return result;
error:
    Py_XDECREF(key);
    Py_XDECREF(value);
    Py_XDECREF(buckets);
    Py_DECREF(result);
    return NULL;
}

static PyMethodDef accumulator_methods[] = {
    {"add", (PyCFunction)(void (*)(void))accumulator_add, METH_FASTCALL,
     "add(series, bucket, delta): add one delta (metrics.customer.add_delta)."},
    {"add_deltas", (PyCFunction)accumulator_add_deltas, METH_O,
     "add_deltas(deltas): add every delta of a {series: {bucket: delta}}."},
    {"rows", (PyCFunction)accumulator_rows, METH_NOARGS,
     "rows() -> [series, [bucket, delta, ...], ...]: the nonzero deltas grouped by series, in\n"
     "first-insertion order (metrics.customer.grouped_rows of the dict the same additions make)."},
    {"as_dict", (PyCFunction)accumulator_as_dict, METH_NOARGS,
     "as_dict() -> {series: {bucket: delta}}: the nonzero deltas."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DeltaAccumulatorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "metrics._blocks.DeltaAccumulator",
    .tp_basicsize = sizeof(DeltaAccumulator),
    .tp_dealloc = (destructor)accumulator_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "DeltaAccumulator(): a message's deltas of one store, {series: {bucket: delta}} in int64 cells\n"
              "(exact: a sum past int64 becomes a Python int). The native contribution loops add into it;\n"
              "rows() gives the deltas topic's grouped rows.",
    .tp_methods = accumulator_methods,
    .tp_new = accumulator_new,
};

/* the first index of sorted values[0..count) whose value is greater than target */
static Py_ssize_t after(const long long *values, Py_ssize_t count, long long target)
{
    Py_ssize_t low = 0, high = count;
    while (low < high) {
        Py_ssize_t middle = low + (high - low) / 2;
        if (values[middle] <= target)
            low = middle + 1;
        else
            high = middle;
    }
    return low;
}

typedef struct {
    Py_ssize_t orders;       /* the order buckets and their lifespans from the first order */
    long long *order_buckets, *lifespans;
    Py_ssize_t revenues;     /* the buckets of nonzero revenue, their amounts and negated amounts */
    long long *revenue_buckets;
    PyObject **amounts, **negated;
    long long *starts, *ends; /* one window's purchaser spans */
} OrderInputs;

static void order_inputs_clear(OrderInputs *inputs)
{
    Py_ssize_t i;
    for (i = 0; i < inputs->revenues; i++) {
        Py_XDECREF(inputs->amounts[i]);
        Py_XDECREF(inputs->negated[i]);
    }
    PyMem_Free(inputs->order_buckets);
    PyMem_Free(inputs->lifespans);
    PyMem_Free(inputs->revenue_buckets);
    PyMem_Free(inputs->amounts);
    PyMem_Free(inputs->negated);
    PyMem_Free(inputs->starts);
    PyMem_Free(inputs->ends);
}

/* reads the arguments into inputs: 1 read, 0 declined (nothing set), -1 an error */
static int order_inputs_read(OrderInputs *inputs, PyObject *all_orders, PyObject *order_times,
                             PyObject *revenue_buckets, PyObject *revenue, long long first_order_ms)
{
    Py_ssize_t i, orders, revenues;
    if (!PyList_CheckExact(all_orders) || !PyDict_CheckExact(order_times) || !PyList_CheckExact(revenue_buckets)
        || !PyDict_CheckExact(revenue))
        return 0;
    orders = PyList_GET_SIZE(all_orders);
    revenues = PyList_GET_SIZE(revenue_buckets);
    inputs->order_buckets = PyMem_New(long long, orders + 1);
    inputs->lifespans = PyMem_New(long long, orders + 1);
    inputs->starts = PyMem_New(long long, orders + 1);
    inputs->ends = PyMem_New(long long, orders + 1);
    inputs->revenue_buckets = PyMem_New(long long, revenues + 1);
    inputs->amounts = PyMem_New(PyObject *, revenues + 1);
    inputs->negated = PyMem_New(PyObject *, revenues + 1);
    if (!inputs->order_buckets || !inputs->lifespans || !inputs->starts || !inputs->ends || !inputs->revenue_buckets
        || !inputs->amounts || !inputs->negated) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < orders; i++) {
        PyObject *bucket = PyList_GET_ITEM(all_orders, i), *time;
        long long time_ms;
        if (!small_int(bucket, &inputs->order_buckets[i]))
            return 0;
        time = PyDict_GetItemWithError(order_times, bucket);
        if (time == NULL)
            return PyErr_Occurred() ? -1 : 0;
        if (!small_int(time, &time_ms))
            return 0;
        /* declined past 2**62, so that its negation fits too */
        if (__builtin_sub_overflow(time_ms, first_order_ms, &inputs->lifespans[i])
            || inputs->lifespans[i] > ORDER_LIMIT || inputs->lifespans[i] < -ORDER_LIMIT)
            return 0;
    }
    inputs->orders = orders;
    for (i = 0; i < revenues; i++) {
        PyObject *bucket = PyList_GET_ITEM(revenue_buckets, i), *amount;
        if (!small_int(bucket, &inputs->revenue_buckets[i]))
            return 0;
        amount = PyDict_GetItemWithError(revenue, bucket);
        if (amount == NULL)
            return PyErr_Occurred() ? -1 : 0;
        if (!PyLong_CheckExact(amount))
            return 0;
        inputs->amounts[i] = NULL;
        inputs->negated[i] = NULL;
        inputs->revenues = i + 1;
        Py_INCREF(amount);
        inputs->amounts[i] = amount;
        if ((inputs->negated[i] = PyNumber_Negative(amount)) == NULL)
            return -1;
    }
    return 1;
}

/* one window's deltas (metrics.customer._order_deltas' loop body); 0 or -1 (an error) */
static int order_window(PyObject *out, OrderInputs *inputs, PyObject *names, long long n, long long since,
                        long long sign, int has_second, long long second_order)
{
    Series purchasers, returning, lifespans, churned, retained;
    const long long *orders = inputs->order_buckets;
    long long *starts = inputs->starts, *ends = inputs->ends;
    Py_ssize_t count = inputs->orders, spans = 0, i, index, first_lifespan, recent;
    long long reach = since - 2 * n;

    for (i = after(orders, count, reach); i < count; i++) {
        if (spans > 0 && orders[i] <= ends[spans - 1])
            ends[spans - 1] = orders[i] + n;
        else {
            starts[spans] = orders[i];
            ends[spans] = orders[i] + n;
            spans++;
        }
    }
    if (series_of(out, PyTuple_GET_ITEM(names, 1), &purchasers) < 0
        || series_of(out, PyTuple_GET_ITEM(names, 2), &returning) < 0)
        return -1;
    for (index = 0; index < spans; index++) {
        long long start = starts[index], end = ends[index], low;
        if (end <= since)
            continue;
        low = start > since ? start : since;
        if (add_small(&purchasers, low, sign) < 0 || add_small(&purchasers, end, -sign) < 0)
            return -1;
        if (has_second && end > second_order) {
            low = start > second_order ? start : second_order;
            low = low > since ? low : since;
            if (add_small(&returning, low, sign) < 0 || add_small(&returning, end, -sign) < 0)
                return -1;
        }
    }
    if (series_of(out, PyTuple_GET_ITEM(names, 3), &lifespans) < 0)
        return -1;
    first_lifespan = after(orders, count, since) - 1;
    recent = after(orders, count, since - n);
    for (i = first_lifespan > recent ? first_lifespan : recent; i < count; i++) {
        long long bucket = orders[i], end = bucket + n, lifespan = inputs->lifespans[i] * sign, low;
        if (i + 1 < count && orders[i + 1] < end)
            end = orders[i + 1];
        if (lifespan != 0 && end > since) {
            low = bucket > since ? bucket : since;
            if (add_small(&lifespans, low, lifespan) < 0 || add_small(&lifespans, end, -lifespan) < 0)
                return -1;
        }
    }
    if (series_of(out, PyTuple_GET_ITEM(names, 4), &churned) < 0
        || series_of(out, PyTuple_GET_ITEM(names, 5), &retained) < 0)
        return -1;
    for (i = after(inputs->revenue_buckets, inputs->revenues, reach); i < inputs->revenues; i++) {
        long long bucket = inputs->revenue_buckets[i];
        PyObject *amount = sign > 0 ? inputs->amounts[i] : inputs->negated[i];
        PyObject *minus = sign > 0 ? inputs->negated[i] : inputs->amounts[i];
        long long cursor = bucket + n, period_end = cursor + n, low, high;
        /* "previous period" for j in [b+n, b+2n): churned where the customer is no purchaser */
        index = after(ends, spans, cursor);
        while (index < spans && starts[index] < period_end) {
            if (starts[index] > cursor && starts[index] > since) {
                low = cursor > since ? cursor : since;
                if (add_object(&churned, low, amount) < 0 || add_object(&churned, starts[index], minus) < 0)
                    return -1;
            }
            cursor = ends[index];
            index++;
        }
        if (cursor < period_end && period_end > since) {
            low = cursor > since ? cursor : since;
            if (add_object(&churned, low, amount) < 0 || add_object(&churned, period_end, minus) < 0)
                return -1;
        }
        /* "in W" for j in [b, b+n): retained where the customer was a purchaser n buckets before */
        if (bucket + n > since) {
            long long window_end = bucket + n;
            index = after(ends, spans, bucket - n);
            while (index < spans && starts[index] + n < window_end) {
                low = starts[index] + n;
                high = ends[index] + n;
                low = low > bucket ? low : bucket;
                high = high < window_end ? high : window_end;
                if (high > since) {
                    low = low > since ? low : since;
                    if (add_object(&retained, low, amount) < 0 || add_object(&retained, high, minus) < 0)
                        return -1;
                }
                index++;
            }
        }
    }
    return 0;
}

/* order_deltas(out, all_orders, order_times, revenue_buckets, revenue, second_order, first_order_ms,
 *              windows, since, sign): True once added, None when declined (nothing changed) */
static PyObject *order_deltas(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    OrderInputs inputs;
    PyObject *out, *windows;
    long long second_order = 0, first_order_ms, since, sign;
    int has_second, read;
    Py_ssize_t w;
    (void)module;

    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "order_deltas takes 10 arguments");
        return NULL;
    }
    out = args[0];
    windows = args[7];
    has_second = args[5] != Py_None;
    if (!deltas_target(out) || !PyTuple_CheckExact(windows) || (has_second && !small_int(args[5], &second_order))
        || !small_int(args[6], &first_order_ms) || !small_int(args[8], &since) || !small_int(args[9], &sign)
        || (sign != 1 && sign != -1))
        Py_RETURN_NONE;
    for (w = 0; w < PyTuple_GET_SIZE(windows); w++) {
        PyObject *names = PyTuple_GET_ITEM(windows, w);
        long long n;
        Py_ssize_t k;
        /* since - 2n and bucket + 2n stay within int64 */
        if (!PyTuple_CheckExact(names) || PyTuple_GET_SIZE(names) != 6 || !small_int(PyTuple_GET_ITEM(names, 0), &n)
            || n < 0 || n > LENGTH_LIMIT)
            Py_RETURN_NONE;
        for (k = 1; k < 6; k++)
            if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(names, k)))
                Py_RETURN_NONE;
    }
    memset(&inputs, 0, sizeof inputs);
    read = order_inputs_read(&inputs, args[1], args[2], args[3], args[4], first_order_ms);
    if (read <= 0) {
        order_inputs_clear(&inputs);
        if (read < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    for (w = 0; w < PyTuple_GET_SIZE(windows); w++) {
        PyObject *names = PyTuple_GET_ITEM(windows, w);
        long long n = PyLong_AsLongLong(PyTuple_GET_ITEM(names, 0));
        if (order_window(out, &inputs, names, n, since, sign, has_second, second_order) < 0) {
            order_inputs_clear(&inputs);
            return NULL;
        }
    }
    order_inputs_clear(&inputs);
    Py_RETURN_TRUE;
}

/* ---- activity_deltas --------------------------------------------------------------------- */

/* metrics.intervals.PLUS_INFINITY: an interval ending there has no end delta */
#define PLUS_INFINITY (1LL << 62)

/* the series names the activity family always uses, interned like the Python source's literals */
static PyObject *active_name, *first_name, *members_name;

/* the intervals a Spans holds without allocating (a customer has one or two active intervals) */
#define INLINE_SPANS 8

/* sorted, disjoint intervals [starts[i], ends[i]); a Spans is never copied (it may point into itself) */
typedef struct {
    Py_ssize_t count;
    long long *starts, *ends;
    long long inline_starts[INLINE_SPANS], inline_ends[INLINE_SPANS];
} Spans;

/* empty, owning nothing: safe to clear */
static void spans_init(Spans *spans)
{
    spans->count = 0;
    spans->starts = spans->inline_starts;
    spans->ends = spans->inline_ends;
}

static void spans_clear(Spans *spans)
{
    if (spans->starts != spans->inline_starts) {
        PyMem_Free(spans->starts);
        PyMem_Free(spans->ends);
    }
    spans_init(spans);
}

static int spans_alloc(Spans *spans, Py_ssize_t capacity)
{
    spans->count = 0;
    if (capacity <= INLINE_SPANS) {
        spans->starts = spans->inline_starts;
        spans->ends = spans->inline_ends;
        return 0;
    }
    spans->starts = PyMem_New(long long, capacity);
    spans->ends = PyMem_New(long long, capacity);
    if (spans->starts == NULL || spans->ends == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* a list of (start, end) tuples of ints into spans: 1 read, 0 declined (nothing set), -1 an error */
static int spans_read(Spans *spans, PyObject *intervals)
{
    Py_ssize_t i, count;
    if (!PyList_CheckExact(intervals))
        return 0;
    count = PyList_GET_SIZE(intervals);
    if (spans_alloc(spans, count) < 0)
        return -1;
    for (i = 0; i < count; i++) {
        PyObject *pair = PyList_GET_ITEM(intervals, i);
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2
            || !small_int(PyTuple_GET_ITEM(pair, 0), &spans->starts[i])
            || !small_int(PyTuple_GET_ITEM(pair, 1), &spans->ends[i]))
            return 0;
    }
    spans->count = count;
    return 1;
}

/* result = left intersected with right moved offset later (metrics.intervals.intersect and shift);
 * result holds left->count + right->count intervals */
static void intersect_into(Spans *result, const Spans *left, const Spans *right, long long offset)
{
    Py_ssize_t i = 0, j = 0;
    result->count = 0;
    while (i < left->count && j < right->count) {
        long long right_start = right->starts[j] + offset, right_end = right->ends[j] + offset;
        long long start = left->starts[i] > right_start ? left->starts[i] : right_start;
        long long end = left->ends[i] < right_end ? left->ends[i] : right_end;
        if (start < end) {
            result->starts[result->count] = start;
            result->ends[result->count] = end;
            result->count++;
        }
        if (left->ends[i] < right_end)
            i++;
        else
            j++;
    }
}

/* metrics.customer._add_interval: +weight at the start clipped at since, -weight at a finite end */
static int add_interval(PyObject *out, PyObject *name, long long start, long long end, long long weight,
                        long long since)
{
    Series series;
    if (end <= since || end <= start)
        return 0;
    if (series_of(out, name, &series) < 0 || add_small(&series, start > since ? start : since, weight) < 0)
        return -1;
    if (end < PLUS_INFINITY && add_small(&series, end, -weight) < 0)
        return -1;
    return 0;
}

static int add_spans(PyObject *out, PyObject *name, const Spans *spans, long long weight, long long since)
{
    Py_ssize_t i;
    for (i = 0; i < spans->count; i++)
        if (add_interval(out, name, spans->starts[i], spans->ends[i], weight, since) < 0)
            return -1;
    return 0;
}

/* result = metrics.intervals.spans of the sorted starts after from, each spanning length buckets, merged;
 * result holds count intervals */
static void spans_after(Spans *result, const long long *starts, Py_ssize_t count, long long from, long long length)
{
    Py_ssize_t i;
    result->count = 0;
    for (i = after(starts, count, from); i < count; i++) {
        long long start = starts[i], end = starts[i] + length;
        if (end <= start)
            continue;
        if (result->count > 0 && start <= result->ends[result->count - 1]) {
            if (end > result->ends[result->count - 1])
                result->ends[result->count - 1] = end;
        } else {
            result->starts[result->count] = start;
            result->ends[result->count] = end;
            result->count++;
        }
    }
}

/* the windows tuple of ((n, both, newact, actmem), ...): 1 when every entry fits, else 0 */
static int activity_windows_fit(PyObject *windows)
{
    Py_ssize_t w, k;
    if (!PyTuple_CheckExact(windows))
        return 0;
    for (w = 0; w < PyTuple_GET_SIZE(windows); w++) {
        PyObject *names = PyTuple_GET_ITEM(windows, w);
        long long n;
        if (!PyTuple_CheckExact(names) || PyTuple_GET_SIZE(names) != 4 || !small_int(PyTuple_GET_ITEM(names, 0), &n)
            || n < 0 || n > LENGTH_LIMIT)
            return 0;
        for (k = 1; k < 4; k++)
            if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(names, k)))
                return 0;
    }
    return 1;
}

/* the loop of metrics.customer._activity_deltas over read inputs; 0 or -1 (an error) */
static int activity_loop(PyObject *out, const Spans *active, int has_first, long long first, PyObject *channel_series,
                         const Spans *members, const long long *rewards, Py_ssize_t reward_count,
                         PyObject *windows, long long since, long long sign, Spans *found, Spans *recent)
{
    Py_ssize_t w;
    if (add_spans(out, active_name, active, sign, since) < 0)
        return -1;
    if (has_first) {
        Series series;
        if (series_of(out, first_name, &series) < 0 || add_small(&series, first, sign) < 0)
            return -1;
        if (channel_series != Py_None
            && (series_of(out, channel_series, &series) < 0 || add_small(&series, first, sign) < 0))
            return -1;
    }
    if (add_spans(out, members_name, members, sign, since) < 0)
        return -1;
    for (w = 0; w < PyTuple_GET_SIZE(windows); w++) {
        PyObject *names = PyTuple_GET_ITEM(windows, w);
        long long n = PyLong_AsLongLong(PyTuple_GET_ITEM(names, 0));
        intersect_into(found, active, active, n);
        if (add_spans(out, PyTuple_GET_ITEM(names, 1), found, sign, since) < 0)
            return -1;
        if (has_first && first + n > since) {
            Spans newly;
            spans_init(&newly);
            newly.count = 1;
            newly.inline_starts[0] = first;
            newly.inline_ends[0] = first + n;
            intersect_into(found, active, &newly, 0);
            if (add_spans(out, PyTuple_GET_ITEM(names, 2), found, sign, since) < 0)
                return -1;
        }
        if (members->count > 0 && reward_count > 0) {
            /* the rewards after since - n, each spanning n buckets */
            spans_after(recent, rewards, reward_count, since - n, n);
            if (recent->count > 0) {
                intersect_into(found, members, recent, 0);
                if (add_spans(out, PyTuple_GET_ITEM(names, 3), found, sign, since) < 0)
                    return -1;
            }
        }
    }
    return 0;
}

/* activity_deltas(out, active, first, channel_series, members, reward_buckets, windows, since, sign):
 * True once added, None when declined (nothing changed) */
static PyObject *activity_deltas(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Spans active, members, found, recent;
    PyObject *out, *channel_series, *reward_list, *windows;
    long long first = 0, since, sign, *rewards = NULL;
    Py_ssize_t reward_count = 0, i, capacity;
    int has_first, read;
    (void)module;

    spans_init(&active);
    spans_init(&members);
    spans_init(&found);
    spans_init(&recent);
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "activity_deltas takes 9 arguments");
        return NULL;
    }
    out = args[0];
    has_first = args[2] != Py_None;
    channel_series = args[3];
    reward_list = args[5];
    windows = args[6];
    if (!deltas_target(out) || (has_first && !small_int(args[2], &first))
        || (channel_series != Py_None && !PyUnicode_CheckExact(channel_series)) || !PyList_CheckExact(reward_list)
        || !activity_windows_fit(windows) || !small_int(args[7], &since) || !small_int(args[8], &sign)
        || (sign != 1 && sign != -1))
        Py_RETURN_NONE;
    if ((read = spans_read(&active, args[1])) <= 0 || (read = spans_read(&members, args[4])) <= 0)
        goto done;
    reward_count = PyList_GET_SIZE(reward_list);
    if ((rewards = PyMem_New(long long, reward_count + 1)) == NULL) {
        PyErr_NoMemory();
        read = -1;
        goto done;
    }
    for (i = 0; i < reward_count; i++)
        if (!small_int(PyList_GET_ITEM(reward_list, i), &rewards[i])) {
            read = 0;
            goto done;
        }
    /* an intersection holds at most as many intervals as its two sides together */
    capacity = 2 * active.count + members.count + reward_count + 1;
    if ((read = spans_alloc(&found, capacity)) < 0 || (read = spans_alloc(&recent, reward_count)) < 0)
        goto done;
    read = 1;
    if (activity_loop(out, &active, has_first, first, channel_series, &members, rewards, reward_count, windows, since,
                      sign, &found, &recent) < 0)
        read = -1;
done:
    spans_clear(&active);
    spans_clear(&members);
    spans_clear(&found);
    spans_clear(&recent);
    PyMem_Free(rewards);
    if (read < 0)
        return NULL;
    if (read == 0)
        Py_RETURN_NONE;
    Py_RETURN_TRUE;
}

/* ---- cohort_deltas ----------------------------------------------------------------------- */

/* metrics.customer.COHORT_PERIODS: a cohort's month bounds are COHORT_PERIODS + 2 month starts */
#define COHORT_PERIODS 12
#define MINUS_INFINITY (-(1LL << 62))

static PyObject *cohort_count_name, *cohort_current_name;

/* Python's a // b for b > 0 */
static long long floor_div(long long a, long long b)
{
    long long quotient = a / b;
    return (a % b != 0 && a < 0) ? quotient - 1 : quotient;
}

/* a month summary of metrics.customer.MonthSummary, with its month */
typedef struct {
    long long month, activity, close, order;
} Summary;

/* the loop of metrics.customer._cohort_deltas over read inputs; 0 or -1 (an error) */
static int cohort_loop(PyObject *out, long long first, long long cohort, const long long *bounds, PyObject *names,
                       const Spans *active, const Summary *summaries, Py_ssize_t count, long long bucket_ms,
                       long long horizon, long long since, long long sign)
{
    PyObject *active_ends = PyTuple_GET_ITEM(names, 0), *ordered_ends = PyTuple_GET_ITEM(names, 1);
    PyObject *active_now = PyTuple_GET_ITEM(names, 2), *ordered_now = PyTuple_GET_ITEM(names, 3);
    long long limit = bounds[COHORT_PERIODS], latest_activity = MINUS_INFINITY, latest_close = MINUS_INFINITY;
    long long active_from = 0, ordered_from = 0, last, month, end;
    int has_active_from = 0, has_ordered_from = 0, active_then;
    Py_ssize_t i, index = 0, low = 1, high = COHORT_PERIODS + 2, period;

    if (bounds[1] - 1 >= since) {
        Series series;
        if (series_of(out, cohort_count_name, &series) < 0 || add_small(&series, bounds[1] - 1, sign) < 0)
            return -1;
    }
    if (add_interval(out, cohort_current_name, first, bounds[1], sign, since) < 0)
        return -1;
    for (i = 0; i < active->count; i++)
        if (add_interval(out, active_now, active->starts[i], active->ends[i] < limit ? active->ends[i] : limit, sign,
                         since) < 0)
            return -1;
    if (count == 0)
        return 0;
    /* bisect_left(bounds, since + 1, 1) - 1: the first period whose last bucket is >= since */
    while (low < high) {
        Py_ssize_t middle = (low + high) / 2;
        if (bounds[middle] < since + 1)
            low = middle + 1;
        else
            high = middle;
    }
    period = low - 1;
    month = cohort + period;
    while (index < count && summaries[index].month < month) {
        latest_activity = summaries[index].activity > latest_activity ? summaries[index].activity : latest_activity;
        latest_close = summaries[index].close > latest_close ? summaries[index].close : latest_close;
        index++;
    }
    while (period < COHORT_PERIODS) {
        long long first_order = PLUS_INFINITY;
        month = cohort + period;
        while (index < count && summaries[index].month <= month) {
            latest_activity = summaries[index].activity > latest_activity ? summaries[index].activity : latest_activity;
            latest_close = summaries[index].close > latest_close ? summaries[index].close : latest_close;
            if (summaries[index].month == month)
                first_order = summaries[index].order;
            index++;
        }
        last = bounds[period + 1] - 1;
        active_then = latest_activity != MINUS_INFINITY && floor_div(latest_activity, bucket_ms) > last - horizon
                      && latest_close <= latest_activity;
        if (active_then) {
            if (!has_active_from) {
                has_active_from = 1;
                active_from = last;
            }
        } else if (has_active_from) {
            if (add_interval(out, active_ends, active_from, last, sign, since) < 0)
                return -1;
            has_active_from = 0;
        }
        if (first_order != PLUS_INFINITY) {
            if (add_interval(out, ordered_now, floor_div(first_order, bucket_ms), bounds[period + 1], sign, since) < 0)
                return -1;
            if (!has_ordered_from) {
                has_ordered_from = 1;
                ordered_from = last;
            }
        } else if (has_ordered_from) {
            if (add_interval(out, ordered_ends, ordered_from, last, sign, since) < 0)
                return -1;
            has_ordered_from = 0;
        }
        period++;
        if (index == count && !active_then)
            break;
    }
    end = bounds[period + 1] - 1;
    if (has_active_from && add_interval(out, active_ends, active_from, end, sign, since) < 0)
        return -1;
    if (has_ordered_from && add_interval(out, ordered_ends, ordered_from, end, sign, since) < 0)
        return -1;
    return 0;
}

/* the sorted [(month, (activity, close, first order)), ...] into summaries: 1 read, 0 declined, -1 an error */
static int summaries_read(Summary *summaries, PyObject *list)
{
    Py_ssize_t i;
    for (i = 0; i < PyList_GET_SIZE(list); i++) {
        PyObject *entry = PyList_GET_ITEM(list, i), *summary;
        if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2)
            return 0;
        summary = PyTuple_GET_ITEM(entry, 1);
        if (!small_int(PyTuple_GET_ITEM(entry, 0), &summaries[i].month) || !PyTuple_CheckExact(summary)
            || PyTuple_GET_SIZE(summary) != 3 || !small_int(PyTuple_GET_ITEM(summary, 0), &summaries[i].activity)
            || !small_int(PyTuple_GET_ITEM(summary, 1), &summaries[i].close)
            || !small_int(PyTuple_GET_ITEM(summary, 2), &summaries[i].order))
            return 0;
    }
    return 1;
}

/* cohort_deltas(out, first, cohort, bounds, names, active, summaries, bucket_ms, horizon, since, sign):
 * True once added, None when declined (nothing changed) */
static PyObject *cohort_deltas(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Spans active;
    Summary *summaries = NULL;
    PyObject *out, *bounds_tuple, *names, *summary_list;
    long long first, cohort, bounds[COHORT_PERIODS + 2], bucket_ms, horizon, since, sign;
    Py_ssize_t i, count;
    int read;
    (void)module;

    spans_init(&active);
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "cohort_deltas takes 11 arguments");
        return NULL;
    }
    out = args[0];
    bounds_tuple = args[3];
    names = args[4];
    summary_list = args[6];
    if (!deltas_target(out) || !small_int(args[1], &first) || !small_int(args[2], &cohort)
        || !PyTuple_CheckExact(bounds_tuple) || PyTuple_GET_SIZE(bounds_tuple) != COHORT_PERIODS + 2
        || !PyTuple_Check(names) || PyTuple_GET_SIZE(names) != 4 || !PyList_CheckExact(summary_list)
        || !small_int(args[7], &bucket_ms) || bucket_ms <= 0 || !small_int(args[8], &horizon) || horizon < 0
        || horizon > LENGTH_LIMIT || !small_int(args[9], &since) || !small_int(args[10], &sign)
        || (sign != 1 && sign != -1))
        Py_RETURN_NONE;
    for (i = 0; i < COHORT_PERIODS + 2; i++)
        if (!small_int(PyTuple_GET_ITEM(bounds_tuple, i), &bounds[i]))
            Py_RETURN_NONE;
    for (i = 0; i < 4; i++)
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(names, i)))
            Py_RETURN_NONE;
    /* the caller's precondition (a run of the cohort ends after since), without which the Python loop reads
     * past the bounds; and cohort + period within int64 */
    if (bounds[COHORT_PERIODS + 1] - 1 <= since || cohort > ORDER_LIMIT - COHORT_PERIODS)
        Py_RETURN_NONE;
    if ((read = spans_read(&active, args[5])) <= 0)
        goto done;
    count = PyList_GET_SIZE(summary_list);
    if ((summaries = PyMem_New(Summary, count + 1)) == NULL) {
        PyErr_NoMemory();
        read = -1;
        goto done;
    }
    if ((read = summaries_read(summaries, summary_list)) <= 0)
        goto done;
    if (cohort_loop(out, first, cohort, bounds, names, &active, summaries, count, bucket_ms, horizon, since, sign) < 0)
        read = -1;
done:
    spans_clear(&active);
    PyMem_Free(summaries);
    if (read < 0)
        return NULL;
    if (read == 0)
        Py_RETURN_NONE;
    Py_RETURN_TRUE;
}

/* ---- segment_deltas ---------------------------------------------------------------------- */

/* metrics.customer.SEGMENT_CODES: the NPS groups, each with five series per window */
#define SEGMENT_GROUPS 3
#define SEGMENT_NAMES 5

typedef struct {
    long long point, change;
} Step;

static int by_point(const void *left, const void *right)
{
    const Step *a = left, *b = right;
    return a->point < b->point ? -1 : a->point > b->point;
}

/* metrics.customer._window_sums: the points where the window's revenue sum changes, sorted, and the sum from
 * each on; revenue is the sorted (bucket, amount) pairs; returns how many points (steps holds 2 per pair) */
static Py_ssize_t window_sums(Step *steps, const long long *buckets, const long long *amounts, Py_ssize_t count,
                              long long n, long long since)
{
    Py_ssize_t i, taken = 0, points = 0;
    for (i = after(buckets, count, since - n); i < count; i++) {
        steps[taken].point = buckets[i];
        steps[taken++].change = amounts[i];
        steps[taken].point = buckets[i] + n;
        steps[taken++].change = -amounts[i];
    }
    qsort(steps, (size_t)taken, sizeof(Step), by_point);
    /* merged by point, each change then replaced by the running sum (zero changes stay points, as in Python) */
    for (i = 0; i < taken; i++) {
        if (points > 0 && steps[points - 1].point == steps[i].point)
            steps[points - 1].change += steps[i].change;
        else
            steps[points++] = steps[i];
    }
    for (i = 1; i < points; i++)
        steps[i].change += steps[i - 1].change;
    return points;
}

/* the first index of the points greater than bucket (bisect_right) */
static Py_ssize_t points_after(const Step *sums, Py_ssize_t points, long long bucket)
{
    Py_ssize_t low = 0, high = points;
    while (low < high) {
        Py_ssize_t middle = low + (high - low) / 2;
        if (sums[middle].point <= bucket)
            low = middle + 1;
        else
            high = middle;
    }
    return low;
}

/* metrics.customer._WindowSums.add_within: the sum, times sign, at the buckets of spans; 0 or -1 */
static int add_window_sums(const Series *series, const Step *sums, Py_ssize_t points, const Spans *spans, long long sign)
{
    Py_ssize_t i, index;
    for (i = 0; i < spans->count; i++) {
        long long start = spans->starts[i], end = spans->ends[i], value;
        /* the sum at start (_WindowSums.at), then each change after start and before end */
        index = points_after(sums, points, start);
        value = index > 0 ? sums[index - 1].change : 0;
        if (value != 0 && add_small(series, start, value * sign) < 0)
            return -1;
        for (; index < points && sums[index].point < end; index++) {
            long long change = sums[index].change - (index > 0 ? sums[index - 1].change : 0);
            if (change != 0 && add_small(series, sums[index].point, change * sign) < 0)
                return -1;
        }
        if (end < PLUS_INFINITY) {
            index = points_after(sums, points, end - 1);
            value = index > 0 ? sums[index - 1].change : 0;
            if (value != 0 && add_small(series, end, -value * sign) < 0)
                return -1;
        }
    }
    return 0;
}

/* the windows tuple of ((n, (names of group 0, 1, 2)), ...), each names a tuple of five str: 1 fits, else 0 */
static int segment_windows_fit(PyObject *windows)
{
    Py_ssize_t w, g, k;
    if (!PyTuple_CheckExact(windows))
        return 0;
    for (w = 0; w < PyTuple_GET_SIZE(windows); w++) {
        PyObject *entry = PyTuple_GET_ITEM(windows, w), *groups;
        long long n;
        if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2 || !small_int(PyTuple_GET_ITEM(entry, 0), &n)
            || n < 0 || n > LENGTH_LIMIT)
            return 0;
        groups = PyTuple_GET_ITEM(entry, 1);
        if (!PyTuple_CheckExact(groups) || PyTuple_GET_SIZE(groups) != SEGMENT_GROUPS)
            return 0;
        for (g = 0; g < SEGMENT_GROUPS; g++) {
            PyObject *names = PyTuple_GET_ITEM(groups, g);
            if (!PyTuple_CheckExact(names) || PyTuple_GET_SIZE(names) != SEGMENT_NAMES)
                return 0;
            for (k = 0; k < SEGMENT_NAMES; k++)
                if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(names, k)))
                    return 0;
        }
    }
    return 1;
}

typedef struct {
    Py_ssize_t count;           /* segments read */
    long long *groups;
    Spans *spans;               /* each segment's clipped buckets */
    Spans active, started, both, buyers, returning, found;
    Py_ssize_t orders, revenues;
    long long *order_buckets, *revenue_buckets, *amounts;
    Step *sums;
} SegmentInputs;

static void segment_inputs_clear(SegmentInputs *inputs)
{
    Py_ssize_t i;
    for (i = 0; i < inputs->count; i++)
        spans_clear(&inputs->spans[i]);
    PyMem_Free(inputs->groups);
    PyMem_Free(inputs->spans);
    spans_clear(&inputs->active);
    spans_clear(&inputs->started);
    spans_clear(&inputs->both);
    spans_clear(&inputs->buyers);
    spans_clear(&inputs->returning);
    spans_clear(&inputs->found);
    PyMem_Free(inputs->order_buckets);
    PyMem_Free(inputs->revenue_buckets);
    PyMem_Free(inputs->amounts);
    PyMem_Free(inputs->sums);
}

/* reads segments, active, order buckets and revenue: 1 read, 0 declined (nothing set), -1 an error */
static int segment_inputs_read(SegmentInputs *inputs, PyObject *segments, PyObject *active, PyObject *order_buckets,
                               PyObject *revenue)
{
    Py_ssize_t i, count, widest = 0, capacity;
    long long total = 0;
    int read;
    if (!PyList_CheckExact(segments) || !PyList_CheckExact(order_buckets) || !PyList_CheckExact(revenue))
        return 0;
    count = PyList_GET_SIZE(segments);
    inputs->groups = PyMem_New(long long, count + 1);
    inputs->spans = PyMem_New(Spans, count + 1);
    inputs->orders = PyList_GET_SIZE(order_buckets);
    inputs->revenues = PyList_GET_SIZE(revenue);
    inputs->order_buckets = PyMem_New(long long, inputs->orders + 1);
    inputs->revenue_buckets = PyMem_New(long long, inputs->revenues + 1);
    inputs->amounts = PyMem_New(long long, inputs->revenues + 1);
    inputs->sums = PyMem_New(Step, 2 * inputs->revenues + 1);
    if (!inputs->groups || !inputs->spans || !inputs->order_buckets || !inputs->revenue_buckets || !inputs->amounts
        || !inputs->sums) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < count; i++) {
        PyObject *entry = PyList_GET_ITEM(segments, i);
        spans_init(&inputs->spans[i]);
        inputs->count = i + 1;
        if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2
            || !small_int(PyTuple_GET_ITEM(entry, 0), &inputs->groups[i]) || inputs->groups[i] < 0
            || inputs->groups[i] >= SEGMENT_GROUPS)
            return 0;
        if ((read = spans_read(&inputs->spans[i], PyTuple_GET_ITEM(entry, 1))) <= 0)
            return read;
        if (inputs->spans[i].count > widest)
            widest = inputs->spans[i].count;
    }
    if ((read = spans_read(&inputs->active, active)) <= 0)
        return read;
    for (i = 0; i < inputs->orders; i++)
        if (!small_int(PyList_GET_ITEM(order_buckets, i), &inputs->order_buckets[i]))
            return 0;
    for (i = 0; i < inputs->revenues; i++) {
        PyObject *pair = PyList_GET_ITEM(revenue, i);
        long long amount;
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2
            || !small_int(PyTuple_GET_ITEM(pair, 0), &inputs->revenue_buckets[i])
            || !small_int(PyTuple_GET_ITEM(pair, 1), &amount))
            return 0;
        inputs->amounts[i] = amount;
        /* every window sum and change is within the total of the amounts' sizes: within 2**62, or declined */
        total += amount < 0 ? -amount : amount;
        if (total > ORDER_LIMIT)
            return 0;
    }
    capacity = inputs->active.count;
    if (spans_alloc(&inputs->started, capacity) < 0 || spans_alloc(&inputs->both, 2 * capacity + 1) < 0
        || spans_alloc(&inputs->buyers, inputs->orders + 1) < 0
        || spans_alloc(&inputs->returning, inputs->orders + 2) < 0)
        return -1;
    /* an intersection holds at most as many intervals as its two sides together */
    capacity = 2 * capacity + inputs->orders + 2 + widest;
    if (spans_alloc(&inputs->found, capacity) < 0)
        return -1;
    return 1;
}

/* the loop of metrics.customer._segment_deltas over read inputs; 0 or -1 (an error) */
static int segment_loop(PyObject *out, SegmentInputs *inputs, int has_second, long long second_order,
                        PyObject *windows, long long since, long long sign, int activity, int orders)
{
    Py_ssize_t w, i, s;
    Spans *started = &inputs->started, *both = &inputs->both, *buyers = &inputs->buyers;
    Spans *returning = &inputs->returning, *found = &inputs->found;
    for (w = 0; w < PyTuple_GET_SIZE(windows); w++) {
        PyObject *entry = PyTuple_GET_ITEM(windows, w), *groups = PyTuple_GET_ITEM(entry, 1);
        long long n = PyLong_AsLongLong(PyTuple_GET_ITEM(entry, 0));
        Py_ssize_t points = 0;
        Spans after_second;
        /* active at j - n, and at both j and j - n */
        started->count = inputs->active.count;
        for (i = 0; i < inputs->active.count; i++) {
            started->starts[i] = inputs->active.starts[i] + n;
            started->ends[i] = inputs->active.ends[i] + n;
        }
        intersect_into(both, &inputs->active, started, 0);
        /* purchaser at j: an order in j-n+1..j */
        spans_after(buyers, inputs->order_buckets, inputs->orders, since - n, n);
        returning->count = 0;
        if (has_second) {
            spans_init(&after_second);
            after_second.count = 1;
            after_second.inline_starts[0] = second_order;
            after_second.inline_ends[0] = PLUS_INFINITY;
            intersect_into(returning, buyers, &after_second, 0);
        }
        if (inputs->revenues > 0)
            points = window_sums(inputs->sums, inputs->revenue_buckets, inputs->amounts, inputs->revenues, n, since);
        for (s = 0; s < inputs->count; s++) {
            PyObject *names = PyTuple_GET_ITEM(groups, inputs->groups[s]);
            const Spans *segment = &inputs->spans[s];
            if (activity) {
                intersect_into(found, started, segment, 0);
                if (add_spans(out, PyTuple_GET_ITEM(names, 0), found, sign, since) < 0)
                    return -1;
                intersect_into(found, both, segment, 0);
                if (add_spans(out, PyTuple_GET_ITEM(names, 1), found, sign, since) < 0)
                    return -1;
            }
            if (orders) {
                Series series;
                intersect_into(found, buyers, segment, 0);
                if (add_spans(out, PyTuple_GET_ITEM(names, 2), found, sign, since) < 0)
                    return -1;
                intersect_into(found, returning, segment, 0);
                if (add_spans(out, PyTuple_GET_ITEM(names, 3), found, sign, since) < 0)
                    return -1;
                if (inputs->revenues > 0
                    && (series_of(out, PyTuple_GET_ITEM(names, 4), &series) < 0
                        || add_window_sums(&series, inputs->sums, points, segment, sign) < 0))
                    return -1;
            }
        }
    }
    return 0;
}

/* segment_deltas(out, segments, active, order_buckets, second_order, revenue, windows, since, sign, activity,
 *                orders): True once added, None when declined (nothing changed) */
static PyObject *segment_deltas(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    SegmentInputs inputs;
    PyObject *out, *windows;
    long long second_order = 0, since, sign;
    int has_second, activity, orders, read;
    (void)module;

    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "segment_deltas takes 11 arguments");
        return NULL;
    }
    out = args[0];
    windows = args[6];
    has_second = args[4] != Py_None;
    if (!deltas_target(out) || (has_second && !small_int(args[4], &second_order)) || !segment_windows_fit(windows)
        || !small_int(args[7], &since) || !small_int(args[8], &sign) || (sign != 1 && sign != -1)
        || !PyBool_Check(args[9]) || !PyBool_Check(args[10]))
        Py_RETURN_NONE;
    activity = args[9] == Py_True;
    orders = args[10] == Py_True;
    memset(&inputs, 0, sizeof inputs);
    spans_init(&inputs.active);
    spans_init(&inputs.started);
    spans_init(&inputs.both);
    spans_init(&inputs.buyers);
    spans_init(&inputs.returning);
    spans_init(&inputs.found);
    read = segment_inputs_read(&inputs, args[1], args[2], args[3], args[5]);
    if (read > 0 && segment_loop(out, &inputs, has_second, second_order, windows, since, sign, activity, orders) < 0)
        read = -1;
    segment_inputs_clear(&inputs);
    if (read < 0)
        return NULL;
    if (read == 0)
        Py_RETURN_NONE;
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"grouped_rows", (PyCFunction)grouped_rows, METH_O,
     "grouped_rows(deltas) -> [series, [bucket, delta, ...], series, ...]\n\n"
     "The nonzero deltas of a {series: {bucket: delta}} grouped by series, as\n"
     "metrics.customer._grouped_rows does (a series whose deltas all cancelled is left out)."},
    {"add_pairs", (PyCFunction)(void (*)(void))add_pairs, METH_FASTCALL,
     "add_pairs(blocks, sums, pairs, floor, sparse_max, densify, widen) -> the sum below floor, or None\n\n"
     "Add a series' [bucket, delta, bucket, delta, ...] into its blocks and block sums, as\n"
     "metrics.store._add_pairs does; None (nothing done) when a pair is not two ints or a bucket\n"
     "does not fit in 64 bits."},
    {"dense_sum", (PyCFunction)(void (*)(void))dense_sum, METH_FASTCALL,
     "dense_sum(block, start, stop) -> the exact sum of block[start:stop], or None\n\n"
     "For a dense block (an array of int8, int16, int32 or int64); None for any other object,\n"
     "which the caller sums in Python (metrics.store._slot_sum)."},
    {"order_deltas", (PyCFunction)(void (*)(void))order_deltas, METH_FASTCALL,
     "order_deltas(out, all_orders, order_times, revenue_buckets, revenue, second_order, first_order_ms,\n"
     "             windows, since, sign) -> True, or None (declined: nothing changed)\n\n"
     "Add a customer's order-family contributions into out, as metrics.customer._order_deltas does."},
    {"activity_deltas", (PyCFunction)(void (*)(void))activity_deltas, METH_FASTCALL,
     "activity_deltas(out, active, first, channel_series, members, reward_buckets, windows, since, sign)\n"
     "    -> True, or None (declined: nothing changed)\n\n"
     "Add a customer's activity-family contributions but the cohort series into out, as\n"
     "metrics.customer._activity_deltas does."},
    {"cohort_deltas", (PyCFunction)(void (*)(void))cohort_deltas, METH_FASTCALL,
     "cohort_deltas(out, first, cohort, bounds, names, active, summaries, bucket_ms, horizon, since, sign)\n"
     "    -> True, or None (declined: nothing changed)\n\n"
     "Add a customer's cohort series into out, as metrics.customer._cohort_deltas does."},
    {"segment_deltas", (PyCFunction)(void (*)(void))segment_deltas, METH_FASTCALL,
     "segment_deltas(out, segments, active, order_buckets, second_order, revenue, windows, since, sign,\n"
     "               activity, orders) -> True, or None (declined: nothing changed)\n\n"
     "Add a customer's NPS segment series into out, as metrics.customer._segment_deltas does."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "metrics._blocks",
    "The innermost loops of the facts stage and the aggregation in C (see metrics.customer._grouped_rows,\n"
    "metrics.customer._order_deltas, metrics.customer._activity_deltas,\n"
    "metrics.customer._cohort_deltas, metrics.customer._segment_deltas, metrics.store._add_pairs and metrics.store._slot_sum).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__blocks(void)
{
    if ((active_name = PyUnicode_InternFromString("A")) == NULL || (first_name = PyUnicode_InternFromString("F")) == NULL
        || (members_name = PyUnicode_InternFromString("LM")) == NULL
        || (cohort_count_name = PyUnicode_InternFromString("cmN")) == NULL
        || (cohort_current_name = PyUnicode_InternFromString("ckN")) == NULL)
        return NULL;
    if (PyType_Ready(&DeltaAccumulatorType) < 0)
        return NULL;
    PyObject *created = PyModule_Create(&module);
    if (created == NULL)
        return NULL;
    Py_INCREF(&DeltaAccumulatorType);
    if (PyModule_AddObject(created, "DeltaAccumulator", (PyObject *)&DeltaAccumulatorType) < 0) {
        Py_DECREF(&DeltaAccumulatorType);
        Py_DECREF(created);
        return NULL;
    }
    return created;
}
