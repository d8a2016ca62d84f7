// Entry point: a hash router between the job list (#/) and a job page (#/jobs/<id>).

import { initJob, hideJob, showJob } from "./job.js";
import { initList, hideList, showList } from "./list.js";

function route() {
  const match = location.hash.match(/^#\/jobs\/([0-9a-f]{32})$/);
  document.getElementById("list-view").hidden = Boolean(match);
  document.getElementById("job-view").hidden = !match;
  if (match) {
    hideList();
    showJob(match[1]);
    document.getElementById("job-title").focus({ preventScroll: true });
  } else {
    hideJob();
    showList();
  }
}

initList();
initJob();
window.addEventListener("hashchange", route);
route();
