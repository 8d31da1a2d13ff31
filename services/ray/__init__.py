"""The teacher cluster on Ray Serve: teacher and reference deployments behind Serve's proxies."""
