"""Algorithms, one file each, readable top-down."""
