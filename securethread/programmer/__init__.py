"""programmer"""
