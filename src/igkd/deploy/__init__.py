"""igkd.deploy"""
