"""Scenario 2: uploads, checks, storage, thumbnails and delivery of images."""
