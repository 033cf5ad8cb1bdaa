"""Teacher / student construction, layer specs, attention masks, vocabulary handling."""
