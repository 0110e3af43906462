"""What ``gradwatch show | trend | worst | plot | html`` print or draw from a report.

The compact reading shared by the views (`reading`), the text views (`show`), the PNG
figure (`plot`) and the HTML page (`html`). Internal: the public face is `gradwatch.cli`.
"""
