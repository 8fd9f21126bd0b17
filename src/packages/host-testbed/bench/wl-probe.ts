import { buildWorkloadBundle, workloadSpecs } from "./workload.js";
if (process.argv[3]) process.env.HOST_TESTBED_CACHE = process.argv[3];
for (const s of workloadSpecs(Number(process.argv[2] ?? 0.05))) {
  const b = await buildWorkloadBundle(s, console.log);
  console.log(b.size_bytes, b.contentBytes / b.size_bytes);
}
