"""cli: owns argument parsing, printing and exit codes; the only package that prints or exits."""
