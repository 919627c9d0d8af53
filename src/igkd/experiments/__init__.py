"""igkd.experiments"""
