"""igkd.models"""
