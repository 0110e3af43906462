"""What ``gradwatch show | trend | worst | plot | html`` print or draw from a report.

The compact reading shared by the views (`reading`), the text views (`show`), the PNG
figure (`plot`), the HTML page (`html`) and its two charts (`charts`). Internal: the
public face is `gradwatch.cli`.
"""
