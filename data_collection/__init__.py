"""stepprobe.data_collection"""
