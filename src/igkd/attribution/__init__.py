"""igkd.attribution"""
