"""The sources of bootstrap.py, one module per concern.

bootstrap.py is shipped as one readable file built from these modules by
`python/build.py` (see the package README). Nothing here runs on import.
"""
