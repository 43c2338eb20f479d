"""adasched.planner"""
