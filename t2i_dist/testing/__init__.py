"""Support servers for the tests and the benchmarks: real server processes (a moto S3 server, and the helper
that starts any server on a loopback port and retries when the port was taken), stopped by process group."""
