"""adasched.planner.twill"""
