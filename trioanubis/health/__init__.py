"""Health checks: `state` holds the pure rise/fall and slow-start logic, `probe` does the
I/O of one check, `checker` runs one task per server inside the pool's health nursery."""
