import { Testbed } from "../src/testbed.js";
import { ThrowawayHost } from "../src/host.js";
const log = (l: string) => console.error(l);
const bed = await Testbed.start({ log });
const host = await ThrowawayHost.up({ log });
try {
  const p = await bed.provision(host);
  const r = await bed.bootstrap(host, p, { onOutput: (c) => process.stderr.write(c) });
  console.error("exit", r.code, "wall", r.wallMs, "bootstrap_dir", p.config.bootstrap_dir);
  console.error(host.readFile(p.config.bootstrap_dir + "/state.json"));
} finally {
  await host.down();
  await bed.close();
}
