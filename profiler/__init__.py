"""adasched.profiler"""
