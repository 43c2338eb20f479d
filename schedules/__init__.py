"""adasched.schedules"""
