"""Contracts shared by Sightline's processes: the Redis layout of jobs and records, and tracing setup."""
