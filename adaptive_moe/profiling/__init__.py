"""The offline profiler (library) and its command line."""
