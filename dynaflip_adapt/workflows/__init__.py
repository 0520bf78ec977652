"""The product's jobs as library calls: a request object in, a result object out.

The CLI parses options into a request, calls one of these and renders the result; benchmarks
and scripts call the same functions.
"""
