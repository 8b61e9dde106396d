"""The bundled sample data set; see build_sample.py and README.md here."""
