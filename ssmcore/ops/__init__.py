"""Op contracts: argument checks, dispatch to a backend, documented results.

One module per op family (scan, conv, state_update, ssd, norm). Each public op
validates every argument (ssmcore._checks), picks the backend from the arrays
(ssmcore._dispatch) and calls the backend function of the same name with the
same arguments, already validated.
"""
