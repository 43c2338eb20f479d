"""adasched.runtime"""
