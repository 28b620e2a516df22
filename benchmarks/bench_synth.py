import time, numpy as np
from covidct.synth import cohort_table, make_patient, write_patient
t = cohort_table({}, root="/tmp/synthprobe/bench")
for site, g in t.groupby("site", sort=False):
    cpu = []; 
    for _, row in g.head(3).iterrows():
        c0 = time.process_time(); make_patient(row); cpu.append(time.process_time() - c0)
    row = g.iloc[0]
    c0 = time.process_time(); write_patient(row); w = time.process_time() - c0
    print(f"{site:13s} {row.format:5s} slices {g.n_slices.median():5.0f} x {row.matrix}^2  build cpu {np.mean(cpu):.2f} s  build+write cpu {w:.2f} s")
