"""adasched.planner.fsmoe"""
