"""`make demo`, in stages: python -m kapi.demo."""
