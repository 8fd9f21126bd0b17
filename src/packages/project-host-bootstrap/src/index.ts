export * from "./config.js";
export * from "./events.js";
export * from "./builders.js";
export * from "./stub.js";
export * from "./asset.js";
export * from "./userdata.js";
