"""green-mlops: the command line, the embedded models and their build scripts."""
