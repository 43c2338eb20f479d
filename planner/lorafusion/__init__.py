"""adasched.planner.lorafusion"""
