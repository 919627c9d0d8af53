"""igkd.evaluate"""
