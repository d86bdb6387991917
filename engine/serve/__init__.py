"""The HTTP service, `python -m engine.serve` (`app`: Ray Serve with a FastAPI ingress) and its page
(`web/`: HTML, JS, CSS, no build step). Ray is imported only when `app` is."""
