"""adasched.planner.flexsp"""
