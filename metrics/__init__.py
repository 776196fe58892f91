"""Pure customer-loyalty metric math: no I/O, no Faust, no clock reads.

Time is always an argument (epoch milliseconds); money is integer micro-units.
"""
