"""The CNN side. spec.py is plain Python (the API uses it); build.py and capture need torch."""
