"""igkd.data"""
