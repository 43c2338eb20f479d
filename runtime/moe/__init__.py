"""adasched.runtime.moe"""
