"""Glue to other libraries, each imported only when its module is used (seqpar requires none)."""
