"""Segmentation evaluation: Dice, NSD, HD95, ASD per case and class."""
