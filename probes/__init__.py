"""stepprobe.probes"""
