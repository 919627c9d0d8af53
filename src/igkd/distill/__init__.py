"""igkd.distill"""
