"""Backup sources: each produces a plaintext stream plus facts, and restores from one."""
