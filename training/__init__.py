"""stepprobe.training"""
