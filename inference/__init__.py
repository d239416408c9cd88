"""stepprobe.inference"""
