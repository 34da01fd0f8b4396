"""Who owned an IP at a given time: pods, Services and their endpoints over time."""
