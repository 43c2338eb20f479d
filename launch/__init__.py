"""adasched.launch"""
