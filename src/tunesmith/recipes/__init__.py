"""One readable recipe per task family: setup -> fit -> evaluate -> save."""
