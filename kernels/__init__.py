"""adasched.kernels"""
