"""igkd.report"""
